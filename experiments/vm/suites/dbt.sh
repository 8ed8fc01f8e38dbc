# Suite "dbt": the kernel DBT translating a module on every CPU (`kdbt start --module`),
# then (experimental) the kernel's own text (`kdbt start --kernel`),
# steered by EPT and #VE. The module is kdbt_testmod (experiments/guest/kmod): reading
# /proc/kdbt_testmod runs its code in the reader's context, and a timer on every CPU runs
# it in softirq context. Checks: its output identical natively, while started (inscount,
# bbcov, null) and after; every CPU steered into the cache and counted instructions;
# `kdbt cov` names the module's functions and writes a drcov file read back here; the same with the execute right left in place
# must fail; a static key patched while started takes effect (write protection and
# invalidation; with invalidation off it must not); a WARN in the module while started names
# its native functions; 20 start/stop cycles; CPU hotplug, nmi-check and unload while started; the
# refusals. Then the kernel's own text (--kernel): a workload identical, kernel functions
# named by bbcov. (The kernel static key and inscount checks are in suite dbt-kernel.) Sourced by /init (plan/pass/fail/info/check/caught, $NCPUS, $EXPECT_VMX).

export KDBT_MODULE=/lib/modules/kdbt.ko
TESTMOD=/lib/modules/kdbt_testmod.ko

insmod "$TESTMOD" || { plan 1; fail testmod_insmod; exit 0; }
tm() { cat /proc/kdbt_testmod; }
tm > /tmp/tm.native
# The module's own user access with a bad pointer, natively (EFAULT by its fixup).
UACCESS_NATIVE=$(badptr --write /proc/kdbt_testmod_uaccess 2>&1)

# Without VT-x (QEMU TCG), or on shadow paging, `kdbt start` must refuse plainly.
if [ "$EXPECT_VMX" != 1 ] || [ "$KDBT_PAGING" = shadow ]; then
    plan 2
    if [ "$EXPECT_VMX" = 1 ]; then kdbt load >/dev/null; else insmod "$KDBT_MODULE"; fi
    out=$(kdbt start --module kdbt_testmod 2>&1); rc=$?
    info "$out"
    if [ $rc -ne 0 ] && echo "$out" | grep -q "needs the hypervisor loaded with EPT"; then
        pass dbt_refuse_without_ept rc=$rc
    else
        fail dbt_refuse_without_ept rc=$rc
    fi
    tm > /tmp/tm.after
    kdbt unload >/dev/null 2>&1 || rmmod kdbt
    if cmp -s /tmp/tm.native /tmp/tm.after && rmmod kdbt_testmod; then pass dbt_refusal_changes_nothing; else fail dbt_refusal_changes_nothing; fi
    exit 0
fi

plan 26

# Figures of `kdbt stats` for cpu $1: "steered dispatches instructions".
cpu_figs() { kdbt stats | sed -n "s/^  cpu$1: steered \([0-9]*\) (#VE), dispatches \([0-9]*\)\(, instructions \([0-9]*\)\)\{0,1\}.*/\1 \2 \4/p"; }

# The module's code, read on every CPU (taskset) with the timers running (no sleeps: in
# Bochs with 2 CPUs guest idle time costs ~80x in wall time); its output must
# be the native one, and every CPU must have been steered into the cache (and, with
# inscount, counted instructions there). Dispatches may be 0 on a CPU: what another CPU
# translated it finds through the lookup table.
run_started() {
    for c in $(seq 0 $((NCPUS - 1))); do
        taskset -c "$c" cat /proc/kdbt_testmod > /tmp/tm.cpu$c || return 1
        cmp /tmp/tm.native /tmp/tm.cpu$c || { echo "cpu$c: output differs"; cat /tmp/tm.cpu$c; return 1; }
    done
    kdbt stats
    for c in $(seq 0 $((NCPUS - 1))); do
        set -- $(cpu_figs "$c")
        echo "cpu$c: steered=${1:-?} dispatches=${2:-?} instructions=${3:-none}"
        [ "${1:-0}" -gt 0 ] || { echo "cpu$c: steered 0: the module ran natively"; return 1; }
        if [ "$INSCOUNT" = 1 ]; then [ "${3:-0}" -gt 0 ] || { echo "cpu$c: no instruction counted"; return 1; }; fi
    done
}

# check_figs NAME FILE SED CMD...: as check, but CMD's output always goes out as INFO lines,
# and a pass carries the figures SED prints from FILE.
check_figs() {
    local name=$1 file=$2 expr=$3 rc
    shift 3
    "$@" > "/tmp/$name.out" 2>&1; rc=$?
    info "$(cat "/tmp/$name.out")"
    if [ $rc -eq 0 ]; then pass "$name" $(sed -n "$expr" "$file"); else fail "$name" rc=$rc; fi
}

check dbt_load kdbt load
out=$(kdbt start --module kdbt_testmod --client inscount 2>&1); rc=$?
info "$out"
if [ $rc -eq 0 ]; then pass dbt_start client=inscount; else fail dbt_start rc=$rc; fi
INSCOUNT=1 run_started > /tmp/run.out 2>&1; rc=$?
info "$(cat /tmp/run.out)"
if [ $rc -eq 0 ]; then
    pass dbt_module_from_cache_all_cpus $(grep '^cpu[0-9]*: steered=' /tmp/run.out | sed 's/^\(cpu[0-9]*\): /\1_/; s/ / \1_/g' | tr '\n' ' ')
else
    fail dbt_module_from_cache_all_cpus rc=$rc
fi
info "$(kdbt stats --json)"

# inscount is exact and deterministic: N reads of the module's file on cpu0 (one ubench
# process, no fork between reads) add N x k instructions, with the same k (within 1%) for
# N = 8 and N = 16. ubench reads once more before its timed loop, so a run adds N + 1
# reads. The module's timer runs on cpu0 too (~1,600 instructions a tick, once a second):
# each N is measured three times and the fewest instructions kept.
ins_cpu0() { set -- $(cpu_figs 0); echo "${3:-0}"; }
# ins_per_read N: the fewest instructions per read of three runs of N reads.
ins_per_read() {
    local best=0 a b k i
    for i in 1 2 3; do
        a=$(ins_cpu0)
        taskset -c 0 ubench --iters "$1" --reps 1 --only file_read > /dev/null || return 1
        b=$(ins_cpu0)
        k=$(( (b - a) / ($1 + 1) ))
        if [ "$best" -eq 0 ] || [ "$k" -lt "$best" ]; then best=$k; fi
    done
    echo "$best"
}
ins_linear() {
    local k1 k2 d
    k1=$(ins_per_read 8) && k2=$(ins_per_read 16) || return 1
    d=$(( k1 > k2 ? k1 - k2 : k2 - k1 ))
    echo "inscount per read: k=$k1 (8 reads) k=$k2 (16 reads) diff=$d"
    [ "$k1" -gt 0 ] && [ $(( d * 100 )) -le "$k1" ]
}
check_figs dbt_inscount_linear /tmp/dbt_inscount_linear.out 's/^inscount per read: k=\([0-9]*\) .* k=\([0-9]*\) .*/k8=\1 k16=\2/p' ins_linear

# Bad user pointers through the module's code, while started (no oops), as natively: its
# write handler's get_user and the read path's copy to user fault in native kernel code,
# whose fixups return EFAULT to the translated module; the module's own inline user access
# (unsafe_get_user, an entry in the module's exception table) faults in the code cache, in
# the slot kdbt's exception table knows, and takes the module's fixup. A good write of two
# bytes adds their sum.
efault() {
    taskset -c 0 badptr --write /proc/kdbt_testmod_key || return 1
    taskset -c 0 badptr --read /proc/kdbt_testmod || return 1
    [ "$(cat /proc/kdbt_testmod_key)" = off ] || { echo "the key changed"; return 1; }
    echo "natively: $UACCESS_NATIVE"
    echo "$UACCESS_NATIVE" | grep -q ': EFAULT$' || return 1
    local u0 slots s0 s1
    u0=$(cat /proc/kdbt_testmod_uaccess)
    set -- $(cpu_figs 0); s0=${1:-0}
    taskset -c 0 badptr --write /proc/kdbt_testmod_uaccess || return 1
    # It ran translated: cpu0 was steered into the cache meanwhile.
    set -- $(cpu_figs 0); s1=${1:-0}
    echo "cpu0 steered $s0 -> $s1 by the bad write"
    [ "$s1" -gt "$s0" ] || { echo "the write did not enter the cache"; return 1; }
    printf 'AB' > /proc/kdbt_testmod_uaccess || return 1
    [ "$(cat /proc/kdbt_testmod_uaccess)" -eq $((u0 + 131)) ] || { echo "sum $(cat /proc/kdbt_testmod_uaccess), want $((u0 + 131))"; return 1; }
    kdbt stats | grep 'exception-table entries'
    slots=$(kdbt stats | sed -n 's/.*fault sites translated into slots \([0-9]*\),.*/\1/p')
    echo "fault_slots=$slots"
    [ "${slots:-0}" -gt 0 ] || { echo "no fault site was translated"; return 1; }
}
check_figs dbt_bad_user_pointers_efault /tmp/dbt_bad_user_pointers_efault.out 's/^\(fault_slots=[0-9]*\)$/\1/p; s/^cpu0 steered \([0-9]*\) -> \([0-9]*\) .*/steered_before=\1 steered_after=\2/p' efault

# Refusals while started.
refusals() {
    out=$(kdbt start --module kdbt_testmod 2>&1) && return 1
    echo "second start: $out"; echo "$out" | grep -q "already started" || return 1
    out=$(rmmod kdbt_testmod 2>&1) && return 1
    echo "rmmod while started: $out"
    out=$(kdbt dbt-selftest 2>&1) && return 1
    echo "self-test while started: $out"; echo "$out" | grep -q "in use" || return 1
}
check dbt_refusals_started refusals

# NMIs while started: delivered as ever.
check dbt_nmi_check_started kdbt nmi-check

# CPU hotplug while started: cpu1 goes offline and comes back, gets #VE again, and is
# steered into the cache afterwards.
if [ "$NCPUS" -ge 2 ]; then
    hp() {
        before=$(cpu_figs 1 | cut -d' ' -f1)
        echo 0 > /sys/devices/system/cpu/cpu1/online || return 1
        tm > /tmp/tm.off && cmp /tmp/tm.native /tmp/tm.off || return 1
        echo 1 > /sys/devices/system/cpu/cpu1/online || return 1
        taskset -c 1 cat /proc/kdbt_testmod > /tmp/tm.on && cmp /tmp/tm.native /tmp/tm.on || return 1
        after=$(cpu_figs 1 | cut -d' ' -f1)
        echo "cpu1 steered $before -> $after"
        [ "${after:-0}" -gt "${before:-0}" ]
    }
    check dbt_hotplug_cpu1_started hp
else
    pass dbt_hotplug_cpu1_started skipped_single_cpu=1
fi
check dbt_stop kdbt stop
tm > /tmp/tm.stopped
check dbt_output_identical_after_stop cmp /tmp/tm.native /tmp/tm.stopped

# bbcov: the module's functions, named through /proc/kallsyms.
cov_check() {
    kdbt start --module kdbt_testmod --client bbcov || return 1
    tm > /tmp/tm.cov; cmp /tmp/tm.native /tmp/tm.cov || return 1
    kdbt cov --functions > /tmp/cov.txt || return 1
    kdbt cov --drcov /tmp/cov.drcov > /tmp/drcov.out || return 1
    kdbt stop >/dev/null || return 1
    head -12 /tmp/cov.txt
    # (tm_tick, the timer, runs once a second: not necessarily while this lasts.)
    for f in tm_work tm_cmp tm_show tm_mix; do
        grep -q " $f \[kdbt_testmod\]" /tmp/cov.txt || { echo "$f missing"; return 1; }
    done
}
check dbt_bbcov_names_functions cov_check

# The same blocks as a drcov file, read back here: the header, the module table naming
# kdbt_testmod.ko, the count, and every 8-byte record (offset u32, length u16, module id
# u16) inside the module's range.
drcov_check() {
    f=/tmp/cov.drcov
    cat /tmp/drcov.out
    n=$(sed -n 's/^kdbt cov: wrote \([0-9]*\) blocks.*/\1/p' /tmp/drcov.out)
    [ -n "$n" ] && [ "$n" -gt 0 ] || { echo "no blocks written"; return 1; }
    [ "$(head -1 $f)" = "DRCOV VERSION: 2" ] || { echo "bad header"; return 1; }
    grep -a -q "^BB Table: $n bbs\$" $f || { echo "BB Table does not say $n"; return 1; }
    m=$(grep -a ', kdbt_testmod.ko$' $f) || { echo "kdbt_testmod.ko not in the module table"; return 1; }
    echo "module: $m"
    id=$(echo "$m" | cut -d, -f1 | tr -d ' ')
    base=$(echo "$m" | cut -d, -f2 | tr -d ' '); end=$(echo "$m" | cut -d, -f3 | tr -d ' ')
    # Module space is in the top 4 GB: the low 32 bits give the module's size.
    size=$(( 0x${end#0xffffffff} - 0x${base#0xffffffff} ))
    hdr=$(sed -n '1,/^BB Table: /p' $f | wc -c)
    [ "$(wc -c < $f)" -eq $((hdr + 8 * n)) ] || { echo "size $(wc -c < $f) != $hdr + 8*$n"; return 1; }
    od -An -v -tu2 -j "$hdr" $f | tr -s ' ' '\n' | grep -v '^$' > /tmp/drcov.words
    awk -v id="$id" -v size="$size" -v want="$n" '
        { w[NR % 4] = $1 }
        NR % 4 == 0 { k++; off = w[1] + 65536 * w[2]; len = w[3]
            if ($1 != id || len < 1 || len > 4096 || off + len > size) { bad++; print "bad record", k, off, len, $1 } }
        END { print k " records, " bad + 0 " bad, module size " size; exit (bad > 0 || k != want) }' /tmp/drcov.words
}
check_figs dbt_bbcov_drcov_file /tmp/dbt_bbcov_drcov_file.out 's/^\([0-9]*\) records, 0 bad, module size \([0-9]*\)$/records=\1 module_size=\2/p' drcov_check

# The null client, and the check with the execute right left in place (a test hook):
# nothing steers the module's entries, and the check must say so.
INSCOUNT=0
null_run() { kdbt start --module kdbt_testmod $1 >/dev/null || return 1; run_started; r=$?; kdbt stop >/dev/null; return $r; }
check dbt_null_client null_run
caught dbt_catches_native 'steered 0: the module ran natively' null_run --test-no-steer

# Consistency: the module's text is read-only in EPT while started, so a static key's
# text_poke (writing 1 or 0 to /proc/kdbt_testmod_key) is caught before it completes and
# the page's translations are invalidated; the page runs natively until it is made
# read-only again, then is retranslated from its new bytes. Each read after the
# re-protection must follow the key. With invalidation off (a test hook) the old
# translation keeps running, and the check must say so.
key() { cat /proc/kdbt_testmod_key; }
reprotected() {
    n=0
    until kdbt stats | grep -q 'writable now 0$'; do
        n=$((n + 1)); [ $n -lt 300 ] || { echo "the written page was never re-protected"; return 1; }
    done
}
key_run() {
    kdbt start --module kdbt_testmod $1 >/dev/null || return 1
    r=0
    got=$(key); echo "key off: read $got (translated)"; [ "$got" = off ] || r=1
    for want in on off; do
        [ $r -eq 0 ] || break
        if [ $want = on ]; then echo 1 > /proc/kdbt_testmod_key || r=1; else echo 0 > /proc/kdbt_testmod_key || r=1; fi
        reprotected || { r=1; break; }
        got=$(key); echo "key $want: read $got"
        [ "$got" = $want ] || { echo "key $want: a stale translation ran (read $got)"; r=1; }
    done
    kdbt stats | grep 'text writes' | tee /tmp/wp.txt
    w=$(sed -n 's/.*text writes caught \([0-9]*\).*re-protected \([0-9]*\).*/\1 \2/p' /tmp/wp.txt)
    set -- $w
    [ "${1:-0}" -gt 0 ] && [ "${2:-0}" -gt 0 ] || { echo "no text write caught and re-protected"; r=1; }
    got=$(tm | cmp - /tmp/tm.native) || { echo "module output differs after the patches"; r=1; }
    kdbt stop >/dev/null || r=1
    return $r
}
check_figs dbt_static_key_takes_effect /tmp/dbt_static_key_takes_effect.out \
    's/^  text writes caught \([0-9]*\).*re-protected \([0-9]*\).*/writes=\1 reprotected=\2/p' key_run
caught dbt_catches_stale_translation 'a stale translation ran' key_run --test-no-invalidate
echo 0 > /proc/kdbt_testmod_key

# Exceptions in translated code: a WARN in the module (writing to /proc/kdbt_testmod_warn)
# while started. Its ud2 cannot run at its native address (not executable), so kdbt
# delivers the #UD to the kernel's handler with the native pc: the write must succeed,
# the report must name the module's functions (RIP and the caller in the trace) and show
# no address inside kdbt.ko (the code cache, the dispatcher), and the module goes on
# (its output is still the native one). The report is bracketed for dmesg_clean.
warn_run() {
    kdbt start --module kdbt_testmod --client inscount >/dev/null || return 1
    r=0
    printf '<5>KDBT-EXPECTED-BEGIN\n' > /dev/kmsg
    echo 1 > /proc/kdbt_testmod_warn || { echo "the write failed"; r=1; }
    printf '<5>KDBT-EXPECTED-END\n' > /dev/kmsg
    dmesg | sed -n '/KDBT-EXPECTED-BEGIN/,/KDBT-EXPECTED-END/p' | tail -n 80 > /tmp/warn.txt
    grep -E 'WARNING|RIP:|tm_warn|kdbt' /tmp/warn.txt | head -12
    grep -q 'WARNING: .* tm_warn+0x.*\[kdbt_testmod\]' /tmp/warn.txt || { echo "no WARNING line naming tm_warn"; r=1; }
    grep -q 'RIP: 0010:tm_warn+0x' /tmp/warn.txt || { echo "RIP does not name tm_warn"; r=1; }
    grep -q ' tm_warn_write+0x' /tmp/warn.txt || { echo "the trace does not name the caller tm_warn_write"; r=1; }
    if grep -v 'KDBT-EXPECTED' /tmp/warn.txt | grep -q '\[kdbt\]'; then echo "the report shows an address inside kdbt.ko"; r=1; fi
    tm | cmp -s - /tmp/tm.native || { echo "module output differs after the WARN"; r=1; }
    kdbt stop > /tmp/warn.stop || r=1
    cat /tmp/warn.stop
    grep -q ', [1-9][0-9]* exceptions delivered' /tmp/warn.stop || { echo "no exception delivered"; r=1; }
    return $r
}
check_figs dbt_warn_names_native_functions /tmp/warn.stop 's/.*, \([0-9]*\) exceptions delivered.*/delivered=\1/p' warn_run

# An oops in translated code (writing "oops" to /proc/kdbt_testmod_warn: a kernel thread
# of the module loads from an unmapped address, run from the code cache): the oops ends
# that thread, and after the kernel's report (whose RIP is in the cache: the kernel
# prints it before the die notifiers run) kdbt's die notifier must print the native
# state — RIP naming the module's function, a call trace unwound from it naming the
# caller, no address inside kdbt.ko (`[kdbt]`); the module goes on. With
# --test-no-oops-map there is no native state and the check must fail. Bracketed for
# dmesg_clean.
oops_run() {
    kdbt start --module kdbt_testmod $1 >/dev/null || return 1
    r=0
    printf '<5>KDBT-EXPECTED-BEGIN\n' > /dev/kmsg
    echo oops > /proc/kdbt_testmod_warn || { echo "the write failed (the thread did not end)"; r=1; }
    printf '<5>KDBT-EXPECTED-END\n' > /dev/kmsg
    # This run's bracket only (the log has the earlier ones too).
    dmesg | awk '/KDBT-EXPECTED-BEGIN/ { b = ""; on = 1 } on { b = b $0 "\n" } /KDBT-EXPECTED-END/ { on = 0 } END { printf "%s", b }' > /tmp/oops.txt
    sed -n '/kdbt: the oops above is in translated code/,/kdbt: end of the native state/p' /tmp/oops.txt > /tmp/oops.native
    grep -E 'Oops|RIP:' /tmp/oops.txt | head -3; cat /tmp/oops.native
    grep -q 'kdbt: RIP: 0010:tm_oops+0x' /tmp/oops.native || { echo "no native RIP naming tm_oops"; r=1; }
    grep -q 'kdbt:  tm_oops_thread+0x' /tmp/oops.native || { echo "the native trace does not name the caller tm_oops_thread"; r=1; }
    if grep -q '\[kdbt\]' /tmp/oops.native; then echo "the native state shows an address inside kdbt.ko"; r=1; fi
    tm | cmp -s - /tmp/tm.native || { echo "module output differs after the oops"; r=1; }
    kdbt stop >/dev/null || r=1
    return $r
}
check dbt_oops_reports_native_state oops_run
caught dbt_oops_catches_cache_pc 'no native RIP naming tm_oops' oops_run --test-no-oops-map

# 20 start/stop cycles with the module's code run between.
cycles() {
    i=0
    while [ $i -lt 20 ]; do
        kdbt start --module kdbt_testmod --client inscount >/dev/null || { echo "start $i failed"; return 1; }
        tm > /tmp/tm.c && cmp /tmp/tm.native /tmp/tm.c || { echo "cycle $i: output differs"; return 1; }
        kdbt stop >/dev/null || { echo "stop $i failed"; return 1; }
        i=$((i + 1))
    done
}
check dbt_cycles_20 cycles

# The kernel's own text from the cache (`kdbt start --kernel`, experimental): every CPU
# steered, a workload's output identical to its native run (forks, getppid, a bad user
# pointer, file reads, a file written and fsynced, find and tar+gzip over a tree on
# tmpfs), and bbcov names kernel functions that must have run: the system-call,
# page-fault, scheduler and timer paths, all entered from native entry text,
# so only EPT steering brings them in. With the execute right left in place
# (--test-no-steer) nothing is steered and the check must fail.
kwork_tree
kwork > /tmp/kwork.native 2>&1
# The check that must fail needs only a little kernel work to see no CPU steered: a
# process, a pipe and file reads (the full workload there cost ~100 s of wall time on
# Debian in Bochs).
klight() { sh -c 'echo forked'; head -c 5000 /lib/modules/kdbt_testmod.ko | sha256sum; }
klight > /tmp/klight.native 2>&1
# kernel_run WORK [FLAGS]: WORK (kwork or klight) while started, then the checks.
kernel_run() {
    w=$1
    kdbt start --kernel --client bbcov $2 2>&1 || return 1
    $w > /tmp/kwork.started 2>&1
    kdbt stats > /tmp/kstats 2>&1
    kdbt cov --functions > /tmp/kcov 2>&1
    kdbt stop || return 1
    r=0
    cmp /tmp/$w.native /tmp/kwork.started || { echo "the workload's output differs:"; cat /tmp/kwork.started; r=1; }
    cat /tmp/kstats
    for c in $(seq 0 $((NCPUS - 1))); do
        n=$(sed -n "s/^  cpu$c: steered \([0-9]*\) (#VE).*/\1/p" /tmp/kstats)
        [ "${n:-0}" -gt 0 ] || { echo "cpu$c: steered 0: the kernel ran natively"; r=1; }
    done
    # The native regions, with their symbols: one starts at the entry text's first page.
    es=$(sed -n 's/^\([0-9a-f]*\) . __entry_text_start$/\1/p' /proc/kallsyms | head -1)
    grep -q "^    0x${es%???}000\.\.0x[0-9a-f]* ([0-9]* KB) from .*([0-9]* symbols)$" /tmp/kstats \
        || { echo "kdbt stats does not list the entry text (${es:-not in kallsyms}) among the native regions, with its symbols"; r=1; }
    echo "$(wc -l < /tmp/kcov) functions in kdbt cov"; head -8 /tmp/kcov
    # The scheduler as `__schedule`, or `schedule` where `__schedule` is inlined.
    for f in do_syscall_64 exc_page_fault '_*schedule' sysvec_apic_timer_interrupt; do
        grep -q " $f\$" /tmp/kcov || { echo "kdbt cov lacks $f"; r=1; }
    done
    grep -q " __x64_sys_getppid\$" /tmp/kcov && echo "kdbt cov names __x64_sys_getppid" || echo "kdbt cov: no block starts at __x64_sys_getppid"
    $w > /tmp/kwork.after 2>&1; cmp /tmp/$w.native /tmp/kwork.after || { echo "output differs after stop"; r=1; }
    return $r
}
check_figs dbt_kernel_runs_translated /tmp/dbt_kernel_runs_translated.out \
    's/^  blocks \([0-9]*\) .*/blocks=\1/p; s/^\([0-9]*\) functions in kdbt cov$/functions=\1/p' kernel_run kwork
caught dbt_kernel_catches_native 'steered 0: the kernel ran natively' kernel_run klight --test-no-steer

# Unload while started stops first; the module is free again and still right.
unload_started() {
    kdbt start --module kdbt_testmod >/dev/null || return 1
    tm > /dev/null
    kdbt unload || return 1
    tm > /tmp/tm.unloaded && cmp /tmp/tm.native /tmp/tm.unloaded || return 1
    grep -q '^timer_mismatches 0$' /tmp/tm.unloaded || return 1
    rmmod kdbt_testmod
}
check dbt_unload_while_started unload_started

out=$(kdbt start --module kdbt_testmod 2>&1); rc=$?
if [ $rc -ne 0 ]; then pass dbt_refuse_not_loaded; else fail dbt_refuse_not_loaded; fi
info "$out"
check dbt_timer_no_mismatch grep -q '^timer_mismatches 0$' /tmp/tm.unloaded
dmesg_clean dbt_dmesg_clean
