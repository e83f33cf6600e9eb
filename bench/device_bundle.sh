#!/bin/bash
# Split the device bundle's compiler library (.devbundle/a, from ../shared/device/make_bundle.sh) in
# two, so that each upload fits run's 64 MiB beside this working tree, which itself travels on
# every call: with the tree at 13 MB, .devbundle/a (58 MB) alone no longer fits.
#   bash bench/device_bundle.sh       # writes .devbundle/a1/part and .devbundle/a2/part
# Then, on a fresh GPU host, two calls back to back:
#   1. carry [".devbundle/a1"]:
#        mkdir -p /tmp/xzparts && cp .devbundle/a1/part /tmp/xzparts/1
#   2. carry [".devbundle/a2", ".devbundle/b"]:
#        mkdir -p /tmp/tvm_site/tvm/lib && cat /tmp/xzparts/1 .devbundle/a2/part | xz -d -T0 \
#          > /tmp/tvm_site/tvm/lib/libtvm_compiler.so && . .devbundle/b/env.sh && bash bench/gpu_job.sh ...
# While the host stays warm, later calls carry nothing and start with `. /tmp/tvm_site/env.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
whole=.devbundle/a/libtvm_compiler.so.xz
[[ -f $whole ]] || { echo "no $whole: run bash ../shared/device/make_bundle.sh first" >&2; exit 2; }
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | du -cb --files0-from=- | tail -1 | cut -f1)
first=$((64 * 1024 * 1024 - tree - 4 * 1024 * 1024))  # 4 MiB to spare for files written before the call
(( first > 0 )) || { echo "the working tree ($tree bytes) leaves no room for a part" >&2; exit 2; }
rm -rf .devbundle/a1 .devbundle/a2
mkdir -p .devbundle/a1 .devbundle/a2
head -c "$first" "$whole" > .devbundle/a1/part
tail -c +"$((first + 1))" "$whole" > .devbundle/a2/part
cat .devbundle/a1/part .devbundle/a2/part | cmp -s - "$whole" || { echo "split parts differ from $whole" >&2; exit 1; }
second=$(($(du -cb .devbundle/a2/part .devbundle/b | tail -1 | cut -f1) + tree))
echo "tree $tree B; call 1 carries $((first + tree)) B, call 2 $second B (limit $((64 * 1024 * 1024)))"
