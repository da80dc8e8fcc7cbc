#!/usr/bin/env bash
# Side-by-side training benchmark: ember and transformers, same shape, same machine, one run.
#
#   benches/train.sh [DEVICE] [DTYPE] [CONFIG] [BATCH] [SEQ] [STEPS]
#   defaults: cpu f32 benches/configs/qwen3-tiny.json 4 256 10
#   on an H100: benches/train.sh cuda bf16 benches/configs/qwen3-0.6b.json 4 2048 10
#
# EMBER (path of the ember binary) defaults to target/release/ember. Needs torch + transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
device=${1:-cpu}; dtype=${2:-f32}; cfg=${3:-benches/configs/qwen3-tiny.json}
batch=${4:-4}; seq=${5:-256}; steps=${6:-10}
ember=${EMBER:-target/release/ember}
out=$(mktemp /tmp/ember-bench-train-XXXX.jsonl)
echo "== ember"
"$ember" bench train --model-config "$cfg" --batch "$batch" --seq "$seq" --steps "$steps" \
  --device "$device" --dtype "$dtype" --phases --out "$out" ${EMBER_ARGS:-}
echo "== transformers"
python3 benches/reference/train_hf.py --model-config "$cfg" --batch "$batch" --seq "$seq" \
  --steps "$steps" --device "$device" --dtype "$dtype" --out "$out" ${HF_ARGS:-}
echo "== ratio (ember / transformers, training tokens per second)"
python3 - "$out" <<'PY'
import json, sys
rows = {}
for l in open(sys.argv[1]):
    r = json.loads(l)
    rows[r["engine"]] = r
e, t = rows["ember"], rows["transformers"]
mfu = lambda r: f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
print(f"ember {e['tokens_per_s']:.0f} tok/s{mfu(e)}   transformers {t['tokens_per_s']:.0f} tok/s{mfu(t)}   ratio {e['tokens_per_s'] / t['tokens_per_s']:.2f}x")
PY
