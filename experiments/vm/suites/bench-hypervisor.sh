# Suite "bench-hypervisor" (run by `cargo xtask bench hypervisor`): RDTSC microbenchmarks
# with kdbt unloaded and loaded, and the VM exits taken during the loaded run, by reason.
# In Bochs RDTSC advances with executed instructions, so ticks are instruction-cost figures.
# ubench repeats each measurement 5 times; the fastest repetitions are compared.

plan 7
export KDBT_MODULE=/lib/modules/kdbt.ko
ITERS=1000

# exits_between BEFORE AFTER: per-reason exit counts summed over CPUs, AFTER - BEFORE.
exits_between() {
    awk 'NR == FNR { for (i = 1; i <= NF; i++) { split($i, kv, "="); b[kv[1]] += kv[2] } next }
         { for (i = 1; i <= NF; i++) { split($i, kv, "="); a[kv[1]] += kv[2] } }
         END { for (k in a) if (k != "cpu" && k != "virtualized" && k != "online" && k != "launch_cycles") printf "%s=%d ", k, a[k] - b[k] }' "$1" "$2"
}
# ticks NAME FILE [max_]: fastest (or slowest) repetition's ticks per operation.
ticks() { sed -n "s/.*name=$1 .* $3ticks_per_op=\([0-9]*\).*/\1/p" "$2"; }

ubench --iters 200 >/dev/null            # warm up: page cache, first-touch of the binary
ubench --iters $ITERS > /tmp/u0
check load kdbt load
kdbt status --summary > /tmp/s0
ubench --iters $ITERS > /tmp/u1
kdbt status --summary > /tmp/s1
ubench --iters $ITERS --reps 1 --only getppid > /dev/null
kdbt status --summary > /tmp/s2
for b in getppid fork_exit exec page_fault cpuid; do
    pass "bench_$b" unloaded="$(ticks $b /tmp/u0)" loaded="$(ticks $b /tmp/u1)" \
        unloaded_max="$(ticks $b /tmp/u0 max_)" loaded_max="$(ticks $b /tmp/u1 max_)"
done
info "$(cat /tmp/s1)"
pass bench_exits $(exits_between /tmp/s0 /tmp/s1) steady_getppid_exits="$(exits_between /tmp/s1 /tmp/s2 | sed -n 's/.*exits=\([0-9-]*\).*/\1/p')"
kdbt unload > /dev/null
