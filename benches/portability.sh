#!/usr/bin/env bash
# The portability matrix: the same tiny recipe, the same seed and batches, on each backend
# given, for a few steps. Prints each backend's losses against the first backend's (the
# largest absolute difference over the steps) and its steady tokens/s (the median step after
# the first two, which include kernel compilation on GPU backends). Fails when a backend's
# losses differ from the first's by more than TOL (f32; bf16 entries get BF16_TOL).
#
#   benches/portability.sh [BACKEND ...]     BACKEND: cpu | wgpu | vulkan | cuda, with
#                                            :bf16 for bf16 compute (cuda:bf16)
# Environment: EMBER (the binary; default target/release/ember), STEPS (default: the
# recipe's 8), TOL (default 1e-3 nats), BF16_TOL (default 5e-2), RUNS (where the runs go).
set -euo pipefail
cd "$(dirname "$0")/.."
ember=${EMBER:-target/release/ember}
recipe=recipes/experiments/portability-tiny.toml
out=${RUNS:-$(mktemp -d)}
mkdir -p "$out"
backends=("$@")
[ ${#backends[@]} -gt 0 ] || backends=(cpu wgpu)
steps_args=()
[ -n "${STEPS:-}" ] && steps_args=(--set "train.steps=$STEPS")

for b in "${backends[@]}"; do
  device=${b%%:*}
  dtype=f32
  [[ $b == *:bf16 ]] && dtype=bf16
  echo "+ $ember train $recipe --device $device --set train.dtype=$dtype" >&2
  start=$(date +%s%N)
  "$ember" train "$recipe" --device "$device" --set "train.dtype=$dtype" \
    --set "run.out_dir=$out/${b/:/-}" "${steps_args[@]}" >"$out/${b/:/-}.log" 2>&1 \
    || { tail -5 "$out/${b/:/-}.log" >&2; echo "portability: $b failed" >&2; exit 1; }
  echo "$b $(( ($(date +%s%N) - start) / 1000000 ))" >>"$out/wall.txt"
done

python3 - "$out" "${TOL:-1e-3}" "${BF16_TOL:-5e-2}" "${backends[@]}" <<'PY'
import json, statistics, sys
out, tol, bf16_tol, backends = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
wall = dict(l.split() for l in open(f"{out}/wall.txt"))
runs = {}
for b in backends:
    rows = [json.loads(l) for l in open(f"{out}/{b.replace(':', '-')}/portability/metrics.jsonl")]
    runs[b] = [r for r in rows if "loss" in r and "tokens_per_s" in r]
first = backends[0]
print(f"| backend | steps | first loss | last loss | max abs Δ vs {first} | steady tokens/s | wall s |")
print("|---|---:|---:|---:|---:|---:|---:|")
failed = []
for b in backends:
    r, ref = runs[b], runs[first]
    if len(r) != len(ref):
        failed.append(f"{b}: {len(r)} steps, {first}: {len(ref)}")
        continue
    delta = max(abs(x["loss"] - y["loss"]) for x, y in zip(r, ref))
    steady = statistics.median(x["tokens_per_s"] for x in r[2:]) if len(r) > 2 else r[-1]["tokens_per_s"]
    print(f"| {b} | {len(r)} | {r[0]['loss']:.5f} | {r[-1]['loss']:.5f} | {delta:.2e} | {steady:,.0f} | {int(wall[b]) / 1000:.1f} |")
    limit = bf16_tol if b.endswith(":bf16") or first.endswith(":bf16") else tol
    if delta > limit:
        failed.append(f"{b}: losses differ from {first}'s by {delta:.2e} > {limit:.0e}")
if failed:
    sys.exit("portability: " + "; ".join(failed))
print(f"portability: every backend within {tol:.0e} (f32) / {bf16_tol:.0e} (bf16) of {first}")
PY
