#!/bin/sh
# Builds a directory holding Debian's stress-ng and the shared libraries it needs, for
# `cargo xtask vm --suite stress --extra-root DIR` (by hand; not part of cargo xtask test).
# Needs a Debian 12 host (apt-get download, dpkg-deb, ldd). Prints the directory.
# Usage: experiments/vm/stress-ng-root.sh [DIR]   (default ~/.cache/kdbt/stress-ng-root)
set -eu
dir=${1:-$HOME/.cache/kdbt/stress-ng-root}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
echo "stress-ng-root: downloading stress-ng and the libraries the host lacks" >&2
apt-get download stress-ng libipsec-mb1 libjudydebian1 libsctp1 >&2
rm -rf "$dir"
mkdir -p "$dir/lib64" "$dir/lib/x86_64-linux-gnu"
for d in ./*.deb; do dpkg-deb -x "$d" "$dir"; done
rm -rf "$dir/usr/share"
# The rest from the host, as ldd resolves them.
LD_LIBRARY_PATH="$dir/usr/lib/x86_64-linux-gnu" ldd "$dir/usr/bin/stress-ng" | awk '/=> \// { print $3 }' |
    while read -r lib; do
        case $lib in "$dir"/*) ;; *) cp -L "$lib" "$dir/lib/x86_64-linux-gnu/" ;; esac
    done
if LD_LIBRARY_PATH="$dir/usr/lib/x86_64-linux-gnu" ldd "$dir/usr/bin/stress-ng" | grep -q 'not found'; then
    echo "stress-ng-root: libraries still missing:" >&2
    LD_LIBRARY_PATH="$dir/usr/lib/x86_64-linux-gnu" ldd "$dir/usr/bin/stress-ng" | grep 'not found' >&2
    exit 1
fi
cp -L /lib64/ld-linux-x86-64.so.2 "$dir/lib64/"
echo "stress-ng-root: $(du -sh "$dir" | cut -f1) in $dir" >&2
echo "$dir"
