# Suite "demo" (cargo xtask demo): what kdbt does, shown as KDBT-INFO lines: the CPUs'
# VT-x capabilities, a late launch beneath the running kernel, the hypervisor's CPUID
# signature seen from user space on each CPU, per-CPU status, a module's code run from the
# kernel DBT's code cache (kdbt start/stats/cov/stop on kdbt_testmod), and devirtualization.

plan 6
export KDBT_MODULE=/lib/modules/kdbt.ko
cpus() { seq 0 $((NCPUS - 1)); }

check insmod insmod /lib/modules/kdbt.ko
caps=$(kdbt caps 2>&1); rc=$?
info "\$ kdbt caps"
info "$caps"
if [ $rc -eq 0 ]; then pass caps lines="$(echo "$caps" | wc -l)"; else fail caps rc=$rc; fi

if [ "$EXPECT_VMX" = 1 ]; then
    out=$(kdbt load 2>&1); rc=$?
    info "\$ kdbt load"; info "$out"
    for c in $(cpus); do info "\$ taskset -c $c cpuid-sig"; info "$(taskset -c "$c" cpuid-sig)"; done
    info "\$ workload (under kdbt)"; info "$(workload --n 50)"
    info "\$ kdbt status"; info "$(kdbt status 2>&1)"
    if [ $rc -eq 0 ]; then pass load; else fail load rc=$rc; fi
    # The kernel DBT: a module's code from the code cache, steered there by EPT (#VE).
    insmod /lib/modules/kdbt_testmod.ko
    dbt_demo() {
        out=$(kdbt start --module kdbt_testmod --client inscount 2>&1); r=$?
        info "\$ kdbt start --module kdbt_testmod --client inscount"; info "$out"; [ $r -eq 0 ] || return 1
        info "\$ cat /proc/kdbt_testmod"; info "$(cat /proc/kdbt_testmod)"
        info "\$ kdbt stats"; info "$(kdbt stats 2>&1)"
        out=$(kdbt stop 2>&1); r=$?
        info "\$ kdbt stop"; info "$out"; [ $r -eq 0 ] || return 1
        kdbt start --module kdbt_testmod --client bbcov >/dev/null || return 1
        cat /proc/kdbt_testmod > /dev/null
        info "\$ kdbt cov --functions"; info "$(kdbt cov --functions 2>&1)"
        kdbt stop > /dev/null
    }
    if dbt_demo; then pass dbt_module_from_cache; else fail dbt_module_from_cache; fi
    rmmod kdbt_testmod
    out=$(kdbt unload --keep-module 2>&1); rc=$?
    info "\$ kdbt unload --keep-module"; info "$out"
    for c in $(cpus); do info "\$ taskset -c $c cpuid-sig"; info "$(taskset -c "$c" cpuid-sig)"; done
    if [ $rc -eq 0 ]; then pass unload; else fail unload rc=$rc; fi
else
    out=$(kdbt load 2>&1); rc=$?
    info "\$ kdbt load"; info "$out"
    if [ $rc -ne 0 ]; then pass load_refused_without_vtx; else fail load_refused_without_vtx; fi
    pass unload skipped=no_vtx
    pass dbt_module_from_cache skipped=no_vtx
fi
check rmmod rmmod kdbt
