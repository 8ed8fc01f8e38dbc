# Suite "shadow-hook": the mapping stress check must be able to fail. kdbt is loaded with
# shadow paging and a test hook that makes the shadow MMU ignore INVLPG of user addresses
# (stale shadow leaves survive munmap, mprotect and madvise); mapstress must then read
# something other than what it reads natively. Sourced by /init.

export KDBT_MODULE=/lib/modules/kdbt.ko
plan 2
if [ "$EXPECT_VMX" != 1 ]; then
    pass mapstress_catches_missing_invlpg skipped_no_vtx=1
    pass policy_check_catches_missing_apply skipped_no_vtx=1
    exit 0
fi
# The policy check must fail when the policy is not applied to shadow leaves already
# written (test hook of `kdbt shadow-check`).
out=$(kdbt load --paging shadow 2>&1) || info "$out"
out=$(kdbt shadow-check --test-skip-apply 2>&1); rc=$?
info "skip-apply: rc=$rc $out"
kdbt unload > /dev/null 2>&1 || info "unload failed"
if [ $rc -ne 0 ] && echo "$out" | grep -q "did not trap"; then
    pass policy_check_catches_missing_apply
else
    fail policy_check_catches_missing_apply rc=$rc
fi
mkdir -p /tmp/ms
taskset -c 0 mapstress --n 20 --seed 1 --dir /tmp/ms > /tmp/ms.native 2>&1
info "native: $(cat /tmp/ms.native)"
out=$(kdbt load --paging shadow --test-ignore-user-invlpg 2>&1) || { fail mapstress_catches_missing_invlpg load_failed=1; info "$out"; exit 0; }
taskset -c 0 mapstress --n 20 --seed 1 --dir /tmp/ms > /tmp/ms.hook 2>&1; rc=$?
info "with the hook: rc=$rc $(head -c 300 /tmp/ms.hook | tr '\n' ' ')"
# With stale shadow leaves any process may crash (the kdbt CLI itself did once): retry.
kdbt unload > /dev/null 2>&1 || kdbt unload > /dev/null 2>&1 || kdbt unload > /dev/null 2>&1 || info "unload failed"
if ! cmp -s /tmp/ms.native /tmp/ms.hook; then
    pass mapstress_catches_missing_invlpg rc=$rc
else
    fail mapstress_catches_missing_invlpg same_output=1
fi
