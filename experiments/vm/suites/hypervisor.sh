# Suite "hypervisor": late launch on every CPU, identical workload output, 20 load/unload
# cycles, CPU hotplug while loaded, and the refusal paths. Sourced by /init, which provides
# plan/pass/fail/info/check and $NCPUS, $EXPECT_VMX.

# Where `kdbt load` finds the module in the test image.
export KDBT_MODULE=/lib/modules/kdbt.ko

# Without VT-x (QEMU TCG) the only thing to check is a plain refusal that changes nothing.
if [ "$EXPECT_VMX" != 1 ]; then
    plan 2
    out=$(kdbt load 2>&1); rc=$?
    if [ $rc -ne 0 ] && echo "$out" | grep -q "no VT-x" && [ ! -e /sys/module/kdbt ]; then
        pass refuse_no_vtx
    else
        fail refuse_no_vtx rc=$rc
    fi
    info "$out"
    dmesg_clean hv_dmesg_clean
    exit 0
fi

# Shadow paging adds the policy-hook check.
if [ "$KDBT_PAGING" = shadow ]; then plan 23; else plan 24; fi

cpus_list() { seq 0 $((NCPUS - 1)); }

# Signature on every online CPU, each checked by a program pinned with taskset.
sig_all() {
    want=$1
    for c in $(cpus_list); do
        taskset -c "$c" cpuid-sig --expect "$want" >/tmp/sig.$c 2>&1 || { cat /tmp/sig.$c; return 1; }
    done
}

# The workload: busybox sha256sum over a generated file, then getppid, fork+exit, fork+exec
# and a file written, fsynced and read back (experiments/guest/src/bin/workload.rs).
dd if=/dev/urandom of=/tmp/data bs=64k count=16 2>/dev/null
work() { sha256sum /tmp/data && workload --n 100 --dir /tmp; }
# A lighter round for between the 20 load/unload cycles (fewer fork/exec rounds; the same
# sha256sum).
work_light() { sha256sum /tmp/data && workload --n 20 --dir /tmp; }

work > /tmp/w.before
work_light > /tmp/w.light

# Mapping stress on every CPU at once (experiments/guest/src/bin/mapstress.rs): anonymous
# and file-backed mmap/munmap, mprotect, fork with COW both ways, madvise(DONTNEED), every
# byte read back; its output (a checksum of everything read) must equal the native one.
mapstress_all() {
    for c in $(cpus_list); do
        mkdir -p /tmp/ms$c
        taskset -c "$c" mapstress --n 20 --seed $((c + 1)) --dir /tmp/ms$c >/tmp/ms.$1.$c 2>&1 &
    done
    wait
    cat /tmp/ms.$1.*
}
mapstress_all native > /tmp/ms.native
# Fork-heavy (issue 11 saw a fork stressor stall while loaded; it did not reproduce):
# two worker processes per CPU, 100 forks each, every child's copy-on-write result checked
# by its worker (experiments/guest/src/bin/forkstress.rs); the output must equal the native
# one and say errors=0.
FORKS="--workers $((2 * NCPUS)) --forks 100"
forkstress $FORKS > /tmp/fs.native 2>&1

# Single-stepping over CPUID (emulated by kdbt while loaded): the guest's SIGTRAPs, and
# where they stop, must be the same as natively (experiments/guest/src/bin/tf-cpuid.rs).
tf_all() {
    for c in $(cpus_list); do
        taskset -c "$c" tf-cpuid --n 50 >/tmp/tf.$1.$c 2>&1 || { cat /tmp/tf.$1.$c; return 1; }
    done
}
tf_all native || info "tf-cpuid failed natively: $(cat /tmp/tf.native.* | tr '\n' ' ')"

check load kdbt load
check signature_all_cpus sig_all kdbt
virt=$(kdbt status --json | grep -c '"virtualized": true')
if [ "$virt" = "$NCPUS" ]; then pass status_all_virtualized cpus="$virt"; else fail status_all_virtualized cpus="$virt"; kdbt status; fi

work > /tmp/w.loaded
check workload_identical_loaded cmp /tmp/w.before /tmp/w.loaded
mapstress_all loaded > /tmp/ms.loaded
if cmp -s /tmp/ms.native /tmp/ms.loaded && grep -q "errors=0" /tmp/ms.native; then
    pass mapping_stress_identical $(head -1 /tmp/ms.loaded | tr ' ' '\n' | grep fnv1a)
else
    fail mapping_stress_identical; info "native: $(cat /tmp/ms.native | tr '\n' ' ') loaded: $(cat /tmp/ms.loaded | tr '\n' ' ')"
fi
forkstress $FORKS > /tmp/fs.loaded 2>&1
if cmp -s /tmp/fs.native /tmp/fs.loaded && tail -1 /tmp/fs.native | grep -q ' errors=0$'; then
    pass fork_stress_identical $(tail -1 /tmp/fs.loaded | cut -d' ' -f1-2)
else
    fail fork_stress_identical; info "native: $(tr '\n' ' ' < /tmp/fs.native) loaded: $(tr '\n' ' ' < /tmp/fs.loaded)"
fi

tf_same() {
    tf_all loaded || return 1
    for c in $(cpus_list); do
        echo "cpu$c: native $(cat /tmp/tf.native.$c) loaded $(cat /tmp/tf.loaded.$c)"
        cmp -s /tmp/tf.native.$c /tmp/tf.loaded.$c || return 1
    done
}
if tf_same > /tmp/tf.out 2>&1; then
    pass single_step_over_cpuid $(head -1 /tmp/tf.loaded.0)
else
    fail single_step_over_cpuid; info "$(cat /tmp/tf.out)"
fi

# Refusals while loaded.
out=$(kdbt load 2>&1); rc=$?
if [ $rc -ne 0 ] && echo "$out" | grep -q "already loaded"; then pass refuse_second_load; else fail refuse_second_load rc=$rc; info "$out"; fi
# VMCALL from user space on each CPU: SIGILL (status 132), and the hypervisor saw it (its
# VMCALL exit count on that CPU went up; natively the CPU would raise #UD by itself).
vmcalls() { kdbt status --summary | sed -n "s/^cpu=$1 .* vmcall=\([0-9]*\).*/\1/p"; }
user_vmcall() {
    for c in $(cpus_list); do
        before=$(vmcalls "$c"); before=${before:-0}
        taskset -c "$c" vmcall-user >/dev/null 2>&1; rc=$?
        after=$(vmcalls "$c"); after=${after:-0}
        echo "cpu$c: rc=$rc vmcall exits $before -> $after"
        [ "$rc" -eq 132 ] && [ "$after" -gt "$before" ] || return 1
    done
}
check user_vmcall_sigill user_vmcall

# NMIs: one sent to each CPU and one its handler sends itself while NMIs are blocked
# must both arrive, through kdbt's NMI exits and the NMI window.
out=$(kdbt nmi-check 2>&1); rc=$?
info "$out"
# "cpu0: nmis=2 exits=2 ..." -> "cpu0_nmis=2 cpu0_exits=2 ..." for the results table.
figs=$(echo "$out" | sed 's/.*: nmi_virt/nmi_virt/' | awk '{for (i = 1; i <= NF; i++) { t = $i; gsub(";", "", t);
    if (t ~ /^cpu[0-9]+:$/) c = substr(t, 1, length(t) - 1) "_"; else if (t ~ /=/) printf "%s%s ", c, t } }')
if [ $rc -eq 0 ]; then pass nmi_delivery_all_cpus $figs; else fail nmi_delivery_all_cpus rc=$rc; fi

if [ "$KDBT_PAGING" = shadow ]; then
    # Shadow paging has no EPT: `kdbt ept-check` must refuse, and in its place every CPU
    # must run on shadow tables the MMU filled (faults resolved, CR3 switches seen).
    out=$(kdbt ept-check 2>&1); rc=$?
    info "ept-check skipped (shadow paging has no EPT): rc=$rc $out"
    shadow_figs() {
        for c in $(cpus_list); do
            l=$(kdbt status --summary | grep "^cpu=$c ")
            echo "$l" | grep -q " paging=shadow " || { echo "cpu$c: not on shadow paging: $l"; return 1; }
            res=$(echo "$l" | sed -n 's/.* faults_resolved=\([0-9]*\).*/\1/p')
            cr3=$(echo "$l" | sed -n 's/.* cr3_switches=\([0-9]*\).*/\1/p')
            use=$(echo "$l" | sed -n 's/.* shadow_pages_in_use=\([0-9]*\).*/\1/p')
            echo "cpu${c}_resolved=$res cpu${c}_cr3=$cr3 cpu${c}_pages=$use"
            [ "${res:-0}" -gt 0 ] && [ "${cr3:-0}" -gt 0 ] && [ "${use:-0}" -gt 0 ] || return 1
        done
    }
    if figs=$(shadow_figs) && [ $rc -ne 0 ]; then pass shadow_mmu_all_cpus $figs; else fail shadow_mmu_all_cpus rc=$rc $figs; kdbt status; fi
    info "$(kdbt status --summary)"
    # The permission hook: a page made not writable traps a write on every CPU, through a
    # shadow leaf that was writable before the change.
    out=$(kdbt shadow-check 2>&1); rc=$?
    info "$out"
    pf=$(echo "$out" | grep -o 'cpu[0-9]*_policy_faults=[0-9]*' | tr '\n' ' ')
    if [ $rc -eq 0 ] && [ "$(echo "$pf" | wc -w)" = "$NCPUS" ]; then pass shadow_policy_all_cpus $pf; else fail shadow_policy_all_cpus rc=$rc; fi
else
    # Per-4 KB EPT permission changes, each followed by INVEPT on every CPU.
    out=$(kdbt ept-check 2>&1); rc=$?
    info "$out"
    inv=$(echo "$out" | grep -o 'cpu[0-9]*_invept=[0-9]*' | tr '\n' ' ')
    stale=$(echo "$out" | grep -o 'stale_violations_retried=[0-9]*')
    if [ $rc -eq 0 ] && [ "$(echo "$inv" | wc -w)" = "$NCPUS" ]; then pass ept_perms_all_cpus $inv $stale; else fail ept_perms_all_cpus rc=$rc; fi
    # EPT steering: the kernel DBT's self-test, loaded, adds a native call of a page whose
    # execute right is gone; the #VE it takes must bring it into the code cache.
    out=$(kdbt dbt-selftest 2>&1); rc=$?
    info "$out"
    if [ $rc -eq 0 ] && echo "$out" | grep -q 'EPT steering: 1 #VE'; then
        pass dbt_ve_steering insns=$(echo "$out" | sed -n 's/.*ran from the cache (\([0-9]*\) instructions).*/\1/p')
    else
        fail dbt_ve_steering rc=$rc
    fi
    # The same with the execute right left in place: the check must see a native run.
    caught dbt_ve_catches_native 'the call ran natively: 0 #VEs' kdbt dbt-selftest --no-steer
fi

# CPU hotplug while loaded (needs a second CPU).
if [ "$NCPUS" -ge 2 ]; then
    hp() {
        echo 0 > /sys/devices/system/cpu/cpu1/online || return 1
        kdbt status --summary | grep -q "^cpu=1 virtualized=0 online=0 " || { kdbt status; return 1; }
        work > /tmp/w.off && cmp /tmp/w.before /tmp/w.off || return 1
        echo 1 > /sys/devices/system/cpu/cpu1/online || return 1
        taskset -c 1 cpuid-sig --expect kdbt || return 1
        work > /tmp/w.on && cmp /tmp/w.before /tmp/w.on
    }
    check hotplug_cpu1 hp
else
    pass hotplug_cpu1 skipped_single_cpu=1
fi

check unload kdbt unload
check signature_gone sig_all none

# 20 load/unload cycles with the workload in between: each launches and devirtualizes
# every CPU. The module stays inserted between cycles (module removal waits for RCU grace
# periods, which an idle Bochs guest plays out very slowly); the last unload removes it.
cycles() {
    i=0
    while [ $i -lt 20 ]; do
        kdbt load >/dev/null || { echo "load $i failed"; return 1; }
        work_light > /tmp/w.c || return 1
        cmp /tmp/w.light /tmp/w.c || return 1
        kdbt unload --keep-module >/dev/null || { echo "unload $i failed"; return 1; }
        i=$((i + 1))
    done
    kdbt unload >/dev/null 2>&1 || true
    [ ! -e /sys/module/kdbt ] || { echo "module still inserted"; return 1; }
}
check cycles_20 cycles
check signature_gone_after_cycles sig_all none
work > /tmp/w.after
check workload_identical_after cmp /tmp/w.before /tmp/w.after

# Refusals while not loaded: module absent, and module inserted with no CPU virtualized
# (the idle module is removed, the command still fails).
refuse_unload() {
    out=$(kdbt unload 2>&1); rc=$?
    echo "module absent: rc=$rc $out"
    [ $rc -ne 0 ] && echo "$out" | grep -q "not loaded" || return 1
    insmod "$KDBT_MODULE" || return 1
    out=$(kdbt unload 2>&1); rc=$?
    echo "module idle: rc=$rc $out"
    [ $rc -ne 0 ] && echo "$out" | grep -q "not loaded" && [ ! -e /sys/module/kdbt ]
}
check refuse_unload_not_loaded refuse_unload
# (Shadow paging needs no EPT: there the feature taken away is CR3-load/store exiting.)
if [ "$KDBT_PAGING" = shadow ]; then missing=CR3_EXITING; else missing=EPT; fi
out=$(kdbt load --param fake_missing=$missing 2>&1); rc=$?
if [ $rc -ne 0 ] && echo "$out" | grep -q "$missing" && sig_all none && [ ! -e /sys/module/kdbt ]; then
    pass refuse_missing_feature missing=$missing
else
    fail refuse_missing_feature rc=$rc; info "$out"
fi

# A launch that fails on a later CPU (cpu1 here, after VMXON) rolls back every CPU already
# launched: the load fails naming that CPU, no CPU keeps the signature, the module is gone.
if [ "$NCPUS" -ge 2 ]; then
    out=$(kdbt load --param fail_launch_cpu=1 2>&1); rc=$?
    if [ $rc -ne 0 ] && echo "$out" | grep -q "cpu1" && sig_all none && [ ! -e /sys/module/kdbt ]; then
        pass rollback_on_failed_launch
    else
        fail rollback_on_failed_launch rc=$rc
    fi
    info "$out"
else
    pass rollback_on_failed_launch skipped_single_cpu=1
fi

# A VMWRITE that fails (the hook sets a reserved bit in GUEST_CR3's encoding on the last
# CPU) aborts that CPU's launch naming the field and rolls back every CPU; a plain load
# and unload work afterwards.
last=$((NCPUS - 1))
out=$(kdbt load --param fail_vmwrite_cpu=$last --param fail_vmwrite_field=0x6802 2>&1); rc=$?
info "$out"
vmwrite_fail() {
    [ $rc -ne 0 ] && echo "$out" | grep -q "cpu$last: VMWRITE GUEST_CR3 (0x6802) failed: VM-instruction error" \
        && sig_all none && [ ! -e /sys/module/kdbt ] || return 1
    kdbt load && sig_all kdbt && kdbt unload && sig_all none
}
check failed_vmwrite_named_and_rolled_back vmwrite_fail

dmesg_clean hv_dmesg_clean
