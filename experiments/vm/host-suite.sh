#!/bin/sh
# Runs one suite on this machine instead of in a test VM, printing the same protocol lines
# (`KDBT-RESULT name PASS|FAIL k=v ...`, `KDBT-INFO ...`) to stdout, for a machine with
# VT-x where RDTSC counts real cycles. Needs root, `kdbt` and the guest programs (`ubench`)
# on PATH, and KDBT_MODULE pointing at a kdbt.ko built for this kernel. Example:
#   sudo env PATH="$PWD/target/release:$PATH" KDBT_MODULE=$PWD/loader/module/kdbt.ko \
#       sh experiments/vm/host-suite.sh bench-paging | tee bench-paging.log
#   cargo xtask bench paging --from-log bench-paging.log --exit-cycles 0
# (No kernel-log check here: dmesg_clean only reports the new kernel-log lines.)
set -u
suite=${1:?usage: host-suite.sh SUITE}
dir=$(dirname "$0")
[ -f "$dir/suites/$suite.sh" ] || { echo "no suite $dir/suites/$suite.sh" >&2; exit 2; }
: "${KDBT_MODULE:?set KDBT_MODULE to the kdbt.ko built for this kernel}"
export KDBT_MODULE
emit() { printf '%s\n' "$*"; }
plan() { emit "KDBT-PLAN $1"; }
pass() { _kn=$1; shift; emit "KDBT-RESULT $_kn PASS $*"; }
fail() { _kn=$1; shift; emit "KDBT-RESULT $_kn FAIL $*"; }
info() { printf '%s\n' "$*" | while IFS= read -r _kl; do emit "KDBT-INFO $_kl"; done; }
check() {
    _kname=$1
    shift
    _kout=$("$@" 2>&1); _krc=$?
    if [ $_krc -eq 0 ]; then pass "$_kname"; else fail "$_kname" rc=$_krc; info "$_kout"; fi
    return $_krc
}
caught() {
    _kname=$1; _ktext=$2
    shift 2
    _kout=$("$@" 2>&1); _krc=$?
    info "$_kout"
    if [ $_krc -ne 0 ] && printf '%s\n' "$_kout" | grep -qF -- "$_ktext"; then pass "$_kname" rc=$_krc; else fail "$_kname" rc=$_krc; fi
}
DMESG_MARK=$(dmesg 2>/dev/null | wc -l)
dmesg_clean() { pass "$1" new_lines="$(( $(dmesg 2>/dev/null | wc -l) - DMESG_MARK ))"; }
emit KDBT-BOOT
( . "$dir/suites/$suite.sh" )
emit KDBT-DONE
