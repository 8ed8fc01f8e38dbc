# Suite "stress" (by hand, not in cargo xtask test): twelve stress-ng stressors with two
# workers each and fixed operation counts (fork, mmap, mprotect, pipe, context switch,
# futex, SIGSEGV, bad system-call addresses, vm, page faults, TLB shootdown, brk), first
# natively, then with kdbt loaded; each must complete (stress-ng exits 0) both ways.
# Reports each run's guest time (in Bochs, executed instructions / ips) and, loaded, the
# VM exits by reason. stress-ng comes from --extra-root:
#   cargo xtask vm --suite stress --kernel debian-6.12 \
#       --extra-root "$(experiments/vm/stress-ng-root.sh)"
# (the exec stressor refuses to run as root, which the guest's /init is: not listed.)
export KDBT_MODULE=/lib/modules/kdbt.ko
export LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu
STRESSORS="fork:300 mmap:20:--mmap-bytes:4M mprotect:2000 pipe:20000 switch:20000 futex:5000 sigsegv:2000 sysbadaddr:200 vm:20:--vm-bytes:4M fault:1000 tlb-shootdown:5 brk:200"

if ! command -v stress-ng >/dev/null || [ "$EXPECT_VMX" != 1 ]; then
    plan 1
    fail stress_ng_present "stress-ng=$(command -v stress-ng || echo none)" expect_vmx="$EXPECT_VMX"
    info "suite stress needs VT-x and stress-ng in the guest (--extra-root, see the suite's header)"
    exit 0
fi
plan 26

uptime_s() { cut -d' ' -f1 /proc/uptime; }
# stress MODE NAME:OPS[:EXTRA:ARGS]
stress() {
    mode=$1 name=${2%%:*} rest=${2#*:}
    ops=${rest%%:*} extra=
    [ "$rest" != "$ops" ] && extra=$(echo "${rest#*:}" | tr ':' ' ')
    t0=$(uptime_s)
    # shellcheck disable=SC2086
    out=$(timeout 900 stress-ng --"$name" 2 --"$name"-ops "$ops" $extra --metrics-brief 2>&1); rc=$?
    t1=$(uptime_s)
    info "$(echo "$out" | grep -E "metrc: .* $name |error|fail|skipp")"
    guest=$(awk "BEGIN { print $t1 - $t0 }")
    if [ $rc -eq 0 ]; then pass "stress_${mode}_$name" guest_s="$guest"; else fail "stress_${mode}_$name" rc=$rc guest_s="$guest"; fi
}
for s in $STRESSORS; do stress native "$s"; done
check load kdbt load
for s in $STRESSORS; do stress loaded "$s"; done
info "$(kdbt status --summary)"
check unload kdbt unload
