#!/usr/bin/env bash
# Runs the seeded simulation long, split over parallel jobs.
#   tests/sim/run.sh --seeds N --steps M [--first S] [--jobs J]
# Each job runs a contiguous range of seeds (release build); a failure
# prints its seed and step and the command that replays it. The totals
# (steps, crashes, faults, sends, deliveries) are summed at the end.
set -euo pipefail
seeds=100000 steps=1000 first=0 jobs=$(nproc)
while [ $# -gt 0 ]; do
    case "$1" in
        --seeds) seeds=$2; shift 2 ;;
        --steps) steps=$2; shift 2 ;;
        --first) first=$2; shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        *) echo "usage: $0 --seeds N --steps M [--first S] [--jobs J]" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/../.."
cargo test --release --test simulation --no-run
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
per=$(( (seeds + jobs - 1) / jobs ))
started=$(date +%s)
pids=()
for ((j = 0; j < jobs; j++)); do
    start=$(( first + j * per ))
    count=$(( per < seeds - j * per ? per : seeds - j * per ))
    [ "$count" -gt 0 ] || break
    SIM_FIRST_SEED=$start SIM_SEEDS=$count SIM_STEPS=$steps \
        cargo test --release --test simulation simulated_histories -- --nocapture \
        >"$out/$j.log" 2>&1 &
    pids+=($!)
done
failed=0
for ((j = 0; j < ${#pids[@]}; j++)); do
    if ! wait "${pids[$j]}"; then
        failed=1
        grep -E "failed at step|replay:" "$out/$j.log" >&2 || tail -20 "$out/$j.log" >&2
    fi
done
python3 - "$out" "$seeds" "$steps" "$(( $(date +%s) - started ))" <<'PY'
import re, sys, glob
out, seeds, steps, secs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
total = {}
for path in glob.glob(out + "/*.log"):
    for m in re.finditer(r"Stats \{([^}]*)\}", open(path).read()):
        for k, v in re.findall(r"(\w+): (\d+)", m.group(1)):
            total[k] = total.get(k, 0) + int(v)
print(f"simulation: {seeds} seeds x {steps} steps in {secs} s (summed over jobs): {total}")
PY
exit $failed
