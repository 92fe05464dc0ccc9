#!/usr/bin/env bash
# Compile every source of the C++ extension for aarch64 with Debian's cross compiler, against
# the installed torch's headers, and check that every autotp symbol one object needs another
# defines (linking against torch needs an aarch64 torch, which this machine lacks).
#   apt-get install g++-aarch64-linux-gnu;  bash tools/cross_compile_aarch64.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
INC="$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__) + "/include")')"
OUT="$(mktemp -d)"
for src in autotp/kernels/csrc/*.cpp; do
  aarch64-linux-gnu-g++ -std=c++20 -O2 -fopenmp -fPIC -c "$src" -I"$INC" -I"$INC/torch/csrc/api/include" \
    -o "$OUT/$(basename "$src" .cpp).o"
  echo "compiled $src"
done
missing=0
aarch64-linux-gnu-nm -C --defined-only "$OUT"/*.o > "$OUT/defined.txt"
while read -r sym; do
  if ! grep -qF "$sym" "$OUT/defined.txt"; then
    echo "undefined: $sym"; missing=1
  fi
done < <(aarch64-linux-gnu-nm -C --undefined-only "$OUT"/*.o | sed -n 's/^ *U \(autotp::[^(]*\).*/\1/p' | sort -u)
rm -rf "$OUT"
[ "$missing" = 0 ] && echo "aarch64: every source compiles; every autotp symbol is defined"
exit "$missing"
