#!/bin/sh
# /init of the kdbt test initramfs (busybox sh). `cargo xtask vm` puts the suite
# (experiments/vm/suites/<suite>.sh) at /suite.sh; it is sourced in a subshell, so even a
# syntax error or an `exit` there still ends with KDBT-DONE (and a plan mismatch).
#
# Result protocol, written to /dev/kmsg (kernel cmdline printk.devkmsg=on) so each line
# reaches the serial console whole:
#   KDBT-BOOT                            /init started
#   KDBT-PLAN <n>                        the suite will report <n> checks
#   KDBT-RESULT <name> PASS|FAIL [k=v]   one line per check, figures as key=value
#   KDBT-INFO <text>                     free-form context
#   KDBT-EXPECT-PANIC <name> <text>      the suite makes the kernel panic on purpose: check
#                                        <name> passes if the panic line contains <text>
#   KDBT-DONE                            the suite finished; the bench stops the emulator
#
# Kernel cmdline: kdbt.expect_vmx=0|1 kdbt.cpus=N kdbt.suite=NAME [kdbt.inject_fail=1] [kdbt.paging=ept|shadow].
# Suites get $EXPECT_VMX, $NCPUS, $SUITE and the helpers plan/pass/fail/info/check.

export PATH=/usr/bin:/usr/sbin:/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
[ -e /dev/kmsg ] || mknod /dev/kmsg c 1 11

emit() {
    # One write per line (printf is a shell builtin: no fork, which is slow in Bochs);
    # %.480s keeps lines under the kernel's record limit.
    printf '<5>%.480s\n' "$*" > /dev/kmsg 2>/dev/null || echo "$*"
}
emit KDBT-BOOT

EXPECT_VMX=0; NCPUS=1; SUITE=unknown; INJECT_FAIL=0; KDBT_PAGING=ept
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        kdbt.expect_vmx=*) EXPECT_VMX=${arg#*=} ;;
        kdbt.cpus=*) NCPUS=${arg#*=} ;;
        kdbt.suite=*) SUITE=${arg#*=} ;;
        kdbt.inject_fail=*) INJECT_FAIL=${arg#*=} ;;
        # `kdbt load` reads $KDBT_PAGING when --paging is not given.
        kdbt.paging=*) KDBT_PAGING=${arg#*=} ;;
    esac
done
export EXPECT_VMX NCPUS SUITE INJECT_FAIL KDBT_PAGING

# Helpers keep their variables local so suites may use any names.
plan() { emit "KDBT-PLAN $1"; }
pass() { local _kn=$1; shift; emit "KDBT-RESULT $_kn PASS $*"; }
fail() { local _kn=$1; shift; emit "KDBT-RESULT $_kn FAIL $*"; }
info() {
    local _kl
    while IFS= read -r _kl; do emit "KDBT-INFO $_kl"; done <<EOF_INFO
$*
EOF_INFO
}
# expect_panic NAME TEXT: what follows makes the kernel panic on purpose (the bench then
# passes check NAME if the panic line contains TEXT, and ends the run there).
expect_panic() { local _kn=$1; shift; emit "KDBT-EXPECT-PANIC $_kn $*"; }
# expect_reboot NAME [after-panic]: what follows resets the machine on purpose (the bench
# passes check NAME when a second boot starts, and ends the run there).
expect_reboot() { emit "KDBT-EXPECT-REBOOT $*"; }
# check NAME CMD...: PASS if CMD exits 0; else FAIL rc=N and its output as INFO lines.
check() {
    local _kname=$1 _kout _krc
    shift
    _kout=$("$@" 2>&1); _krc=$?
    if [ $_krc -eq 0 ]; then pass "$_kname"; else fail "$_kname" rc=$_krc; info "$_kout"; fi
    return $_krc
}
# caught NAME TEXT CMD...: a test hook that disables a mechanism must be caught: PASS if
# CMD fails and its output contains TEXT; its output goes out as INFO lines either way.
caught() {
    local _kname=$1 _ktext=$2 _kout _krc
    shift 2
    _kout=$("$@" 2>&1); _krc=$?
    info "$_kout"
    if [ $_krc -ne 0 ] && printf '%s\n' "$_kout" | grep -qF -- "$_ktext"; then pass "$_kname" rc=$_krc; else fail "$_kname" rc=$_krc; fi
}
# Kernel log lines that mean trouble (our own KDBT- lines are excluded).
BAD_DMESG='WARNING|Oops|BUG|general protection|Call Trace|Kernel panic|refcount_t|UBSAN|KASAN|segfault'
# dmesg_mark: remember how long the kernel log is now (done once before the suite).
# dmesg_clean NAME: no bad lines after the mark. Boot-time warnings before it belong to
# the emulated platform; they are shown as INFO and counted as boot_warnings=N.
# dmesg goes to a file, not a pipe (a pipe came back empty on 6.1).
dmesg_mark() {
    dmesg > /tmp/dmesg.mark 2>&1
    DMESG_MARK=$(wc -l < /tmp/dmesg.mark)
}
dmesg_clean() {
    local boot
    dmesg > /tmp/dmesg.all 2>&1
    boot=$(head -n "${DMESG_MARK:-0}" /tmp/dmesg.all | grep -v 'KDBT-' | grep -cE "$BAD_DMESG")
    # A suite brackets what it provokes on purpose (a deliberate WARN) with KDBT-EXPECTED-BEGIN/END.
    tail -n +"$(( ${DMESG_MARK:-0} + 1 ))" /tmp/dmesg.all | sed '/KDBT-EXPECTED-BEGIN/,/KDBT-EXPECTED-END/d' \
        | grep -v 'KDBT-' | grep -E "$BAD_DMESG" > /tmp/dmesg.bad
    if [ -s /tmp/dmesg.bad ]; then
        fail "$1" bad_lines="$(wc -l < /tmp/dmesg.bad)" boot_warnings="$boot"; info "$(head -20 /tmp/dmesg.bad)"
    else
        pass "$1" new_lines="$(( $(wc -l < /tmp/dmesg.all) - ${DMESG_MARK:-0} ))" boot_warnings="$boot"
    fi
}

# The kernel DBT's workload (suites dbt and dbt-kernel), whose output must be the same
# natively and while the kernel runs from the cache; kwork_tree first makes its tree.
kwork_tree() {
    local i
    mkdir -p /tmp/ktree
    for i in 1 2 3 4 5 6 7 8; do
        # 32 KB of the test module per directory (the whole .ko, 376 KB on Debian, made
        # gzip's user-space work a large part of the workload's emulator time).
        mkdir -p /tmp/ktree/d$i && echo $i > /tmp/ktree/d$i/f && head -c 32768 /lib/modules/kdbt_testmod.ko > /tmp/ktree/d$i/m
    done
}
kwork() {
    local i
    sha256sum /lib/modules/kdbt_testmod.ko; ls -l /lib/modules | wc -l
    for i in 1 2 3; do sh -c 'echo forked'; done
    yes | head -c 200000 | wc -c
    ubench --iters 20 --reps 1 --only getppid > /dev/null && echo getppid
    badptr --write /proc/version 2>&1 | head -1
    # A file written, fsynced and read back; find and tar+gzip over a tree on tmpfs.
    dd if=/lib/modules/kdbt_testmod.ko of=/tmp/kw.bin conv=fsync 2>/dev/null && sha256sum < /tmp/kw.bin
    find /tmp/ktree | sort | wc -l
    tar -cf - -C /tmp/ktree . | gzip -1 | sha256sum
}

info "suite=$SUITE kernel=$(uname -r) cpus_expected=$NCPUS expect_vmx=$EXPECT_VMX"

dmesg_mark
boot_bad=$(grep -v 'KDBT-' /tmp/dmesg.mark | grep -E "$BAD_DMESG" | head -5)
[ -n "$boot_bad" ] && info "boot-time kernel warnings (before the suite): $boot_bad"

( . /suite.sh )
rc=$?
[ $rc -eq 0 ] || info "suite script exited with status $rc"
if [ "$INJECT_FAIL" = 1 ]; then
    plan 1
    fail injected_failure reason=KDBT_VM_INJECT_FAIL
fi
emit KDBT-DONE
sync
poweroff -f
# If power-off is not possible the bench stops the emulator after KDBT-DONE.
while :; do sleep 3600; done
