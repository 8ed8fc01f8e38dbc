# Suite "fatal": a VM exit kdbt cannot handle (here an EPT violation, made on purpose on a
# page kdbt owns) ends in a clean kernel panic carrying kdbt's diagnostic (GPA, access,
# rights then and now, guest linear address, RIP), not a silent hang. The panic ends the
# boot, so this suite runs alone. Sourced by /init (plan/pass/fail/info/expect_panic).

export KDBT_MODULE=/lib/modules/kdbt.ko
plan 1
if [ "$EXPECT_VMX" != 1 ]; then
    pass ept_violation_panics skipped_no_vtx=1
    exit 0
fi
out=$(kdbt load 2>&1) || { fail ept_violation_panics load_failed=1; info "$out"; exit 0; }
expect_panic ept_violation_panics "kdbt: fatal VM exit on cpu0: EPT violation: gpa=*access=read*had=---*now=--- type=WB page=4K*gla=*(translated address) at rip="
out=$(kdbt ept-check --violate 2>&1)
# Only reached if the kernel lived on.
fail ept_violation_panics kernel_lived_on=1
info "$out"
