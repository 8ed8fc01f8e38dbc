# Suite "demo" (cargo xtask demo): what kdbt does, shown as KDBT-INFO lines: the CPUs'
# VT-x capabilities, a late launch beneath the running kernel, the hypervisor's CPUID
# signature seen from user space on each CPU, per-CPU status, and devirtualization.

plan 5
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
    out=$(kdbt unload --keep-module 2>&1); rc=$?
    info "\$ kdbt unload --keep-module"; info "$out"
    for c in $(cpus); do info "\$ taskset -c $c cpuid-sig"; info "$(taskset -c "$c" cpuid-sig)"; done
    if [ $rc -eq 0 ]; then pass unload; else fail unload rc=$rc; fi
else
    out=$(kdbt load 2>&1); rc=$?
    info "\$ kdbt load"; info "$out"
    if [ $rc -ne 0 ]; then pass load_refused_without_vtx; else fail load_refused_without_vtx; fi
    pass unload skipped=no_vtx
fi
check rmmod rmmod kdbt
