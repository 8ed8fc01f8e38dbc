# Suite "bench-kernel-dbt" (run by `cargo xtask bench kernel-dbt`): the cost of running a
# module's code from kdbt's code cache. The workload is a read of /proc/kdbt_testmod
# (experiments/guest/kmod: eight calls of the module's hash loop, whose output goes through
# the kernel's seq_printf, so every read leaves the module for native kernel code and comes
# back by #VE), timed by `ubench --only file_read` on cpu0 in RDTSC ticks per read. Modes, in
# one boot: kdbt unloaded, loaded (not started), and started with each client (null,
# inscount, bbcov). One check per mode: kernel_dbt_<mode> ticks= max= ops= reps= and, when
# started, the figures of cpu0 over the measured run (steered #VE, dispatcher entries,
# inscount's instructions) and the engine's (blocks translated, links, lookup misses;
# cached_blocks: blocks translated since start).
# When loaded, also the VM exits of the measured reads (all CPUs; `kdbt status --summary`
# saved by ubench right before the first repetition and right after the last: exits=
# counts those plus one `kdbt status` run, which kernel_dbt_snapshot measures alone, two
# runs back to back, for xtask to subtract).
# In Bochs RDTSC advances with executed instructions: ticks are instruction counts, and
# the delivery of a #VE costs ~0 in that clock (only the stub's instructions are counted).

ITERS=40
plan 6
export KDBT_MODULE=/lib/modules/kdbt.ko
TESTMOD=/lib/modules/kdbt_testmod.ko
insmod "$TESTMOD" || { fail testmod_insmod; exit 0; }

# cpu0's "steered dispatches instructions" from `kdbt stats`.
cpu0_figs() { kdbt stats | sed -n "s/^  cpu0: steered \([0-9]*\) (#VE), dispatches \([0-9]*\)\(, instructions \([0-9]*\)\)\{0,1\}.*/\1 \2 \4/p"; }
# json KEY: a top-level number of `kdbt stats --json`.
json() { kdbt stats --json | sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p"; }
# exits BEFORE AFTER: VM exits summed over CPUs, AFTER - BEFORE (`exits=` of each line).
exits() {
    awk 'NR == FNR { for (i = 1; i <= NF; i++) if ($i ~ /^exits=/) { split($i, kv, "="); b += kv[2]; nb++ } next }
         { for (i = 1; i <= NF; i++) if ($i ~ /^exits=/) { split($i, kv, "="); a += kv[2]; na++ } }
         END { if (nb == 0 || na == 0) print "missing"; else print a - b }' "$1" "$2"
}
# field KEY FILE: KEY's value on the ubench line.
field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" "$2" | head -1; }

# bench MODE [CLIENT]: one timed run on cpu0, one check.
bench() {
    local mode=$1 client=$2 figs=""
    if [ -n "$client" ]; then
        kdbt start --module kdbt_testmod --client "$client" > /tmp/start.out 2>&1 || {
            fail "kernel_dbt_$mode" start_failed=1; info "$(cat /tmp/start.out)"; return; }
        # Warm the cache (translation is not what is measured), then snapshot.
        taskset -c 0 cat /proc/kdbt_testmod > /dev/null
        set -- $(cpu0_figs); local s0=${1:-0} d0=${2:-0} i0=${3:-0}
        local b0 l0 m0; b0=$(json blocks); l0=$(json links); m0=$(json misses)
    fi
    mkdir -p /tmp/st && rm -f /tmp/st/before /tmp/st/after
    if [ "$mode" = unloaded ]; then
        taskset -c 0 ubench --iters $ITERS --only file_read > /tmp/ub 2>&1
    else
        UBENCH_STATUS_DIR=/tmp/st taskset -c 0 ubench --iters $ITERS --only file_read > /tmp/ub 2>&1
    fi
    local rc=$?
    [ "$mode" != unloaded ] && [ $rc -eq 0 ] && figs="exits=$(exits /tmp/st/before /tmp/st/after)"
    if [ -n "$client" ]; then
        set -- $(cpu0_figs)
        figs="$figs steered=$((${1:-0} - s0)) dispatches=$((${2:-0} - d0)) blocks=$(($(json blocks) - b0))"
        figs="$figs links=$(($(json links) - l0)) misses=$(($(json misses) - m0)) cached_blocks=$(json blocks)"
        [ "$client" = inscount ] && figs="$figs instructions=$((${3:-0} - i0))"
        kdbt stop > /tmp/stop.out 2>&1 || { fail "kernel_dbt_$mode" stop_failed=1; info "$(cat /tmp/stop.out)"; return; }
    fi
    if [ $rc -ne 0 ]; then
        fail "kernel_dbt_$mode" ubench_failed=1; info "$(cat /tmp/ub)"; return
    fi
    pass "kernel_dbt_$mode" ticks="$(field ticks_per_op /tmp/ub)" max="$(field max_ticks_per_op /tmp/ub)" \
        ops="$(field ops /tmp/ub)" reps="$(field reps /tmp/ub)" $figs
}

taskset -c 0 ubench --iters 5 --reps 1 --only file_read > /dev/null 2>&1   # first touch
bench unloaded
if ! kdbt load > /tmp/load.out 2>&1; then
    info "$(cat /tmp/load.out)"
    for m in snapshot loaded null inscount bbcov; do fail "kernel_dbt_$m" load_failed=1; done
    exit 0
fi
kdbt status --summary > /tmp/c0 2>&1
kdbt status --summary > /tmp/c1 2>&1
pass kernel_dbt_snapshot exits="$(exits /tmp/c0 /tmp/c1)"
bench loaded
bench null null
bench inscount inscount
bench bbcov bbcov
kdbt unload > /dev/null 2>&1
