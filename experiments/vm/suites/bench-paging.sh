# Suite "bench-paging" (run by `cargo xtask bench paging`): the same RDTSC microbenchmarks
# natively (kdbt unloaded), under `kdbt load --paging ept` and under `kdbt load --paging
# shadow`, in one boot, with the VM exits of each benchmark by reason (kdbt status before
# and after it, summed over CPUs). In Bochs RDTSC advances with executed instructions, so
# ticks are instruction-cost figures; xtask adds a modeled cost per VM exit.
# One check per benchmark and mode: paging_<bench>_<mode> ticks= max= ops= reps= and, when
# loaded, exits=<all> <reason>=<n> ... (shadow adds the shadow-MMU counters), and
# paging_snapshot_<mode>: the exits of one `kdbt status` run, subtracted by xtask.
# No sleeps anywhere (idle time is very slow in Bochs with 2 CPUs).

BENCHES="getppid fork_exit exec page_fault mmap_munmap pipe_pingpong tlb_walk macro"
plan 31
export KDBT_MODULE=${KDBT_MODULE:-/lib/modules/kdbt.ko}   # host-suite.sh passes its own
ITERS=500

# delta BEFORE AFTER: per-key counts summed over CPUs, AFTER - BEFORE; shadow_pages_in_use is
# the level after (a count of pages, not of events); keys that are not counters are left out.
delta() {
    awk 'NR == FNR { for (i = 1; i <= NF; i++) { split($i, kv, "="); b[kv[1]] += kv[2] } next }
         { for (i = 1; i <= NF; i++) { split($i, kv, "="); a[kv[1]] += kv[2] } }
         END { for (k in a) {
                 if (k == "cpu" || k == "virtualized" || k == "online" || k == "launch_cycles" || k == "paging" || k == "shadow_pages_total" || k == "shadow_roots") continue
                 if (k == "shadow_pages_in_use") printf "%s=%d ", k, a[k]; else printf "%s=%d ", k, a[k] - b[k] } }' "$1" "$2"
}
# field KEY FILE: KEY's value on the ubench line.
field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" "$2" | head -1; }

# bench MODE NAME: one benchmark, one check. Loaded, ubench saves `kdbt status --summary`
# just before its first repetition and just after its last (UBENCH_STATUS_DIR), so the
# exits are those of the measured loop plus one `kdbt status` run, which
# paging_snapshot_<mode> measures on its own (two status runs back to back) for xtask to
# subtract.
bench() {
    local mode=$1 b=$2 figs=""
    mkdir -p /tmp/st && rm -f /tmp/st/before /tmp/st/after
    if [ "$mode" = native ]; then
        ubench --iters $ITERS --only "$b" > /tmp/ub 2>&1
    else
        UBENCH_STATUS_DIR=/tmp/st ubench --iters $ITERS --only "$b" > /tmp/ub 2>&1
    fi
    if [ $? -ne 0 ]; then
        fail "paging_${b}_$mode" ubench_failed=1; info "$(cat /tmp/ub)"; return
    fi
    if [ "$mode" != native ]; then
        figs=$(delta /tmp/st/before /tmp/st/after)
    fi
    pass "paging_${b}_$mode" ticks="$(field ticks_per_op /tmp/ub)" max="$(field max_ticks_per_op /tmp/ub)" \
        ops="$(field ops /tmp/ub)" reps="$(field reps /tmp/ub)" $figs
}

# Warm up: page cache, first touch of the binaries.
ubench --iters 100 > /dev/null 2>&1
ubench --iters 100 --only macro > /dev/null 2>&1
for b in $BENCHES; do bench native "$b"; done
for mode in ept shadow; do
    if check "load_$mode" kdbt load --paging "$mode"; then
        kdbt status --summary > /tmp/c0 2>&1
        kdbt status --summary > /tmp/c1 2>&1
        pass "paging_snapshot_$mode" $(delta /tmp/c0 /tmp/c1)
        for b in $BENCHES; do bench "$mode" "$b"; done
        info "$mode: $(kdbt status --summary 2>&1)"
        check "unload_$mode" kdbt unload
    else
        for b in snapshot $BENCHES; do fail "paging_${b}_$mode" load_failed=1; done
        fail "unload_$mode" load_failed=1
    fi
done
dmesg_clean paging_dmesg_clean
