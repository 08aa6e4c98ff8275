#!/usr/bin/env bash
# Instructions per proxied request of bench/micro_h1.py, counted by callgrind.
# Deterministic (unlike time on a shared machine): the difference between
# N and 2N requests, divided by N, so start-up cancels out.
#   bench/instructions.sh [N=2000] [micro_h1.py options, e.g. --obs default]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
shift || true
count() {
  PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
    .venv/bin/python bench/micro_h1.py --n "$1" "${@:2}" 2>&1 | awk '/Collected/{print $4}'
}
a=$(count "$n" "$@")
b=$(count $((n * 2)) "$@")
echo "instructions/request: $(( (b - a) / n ))"
