#!/usr/bin/env bash
# Side-by-side encoder (ModernBERT MLM) training benchmark: ember and transformers, same
# shape, same machine, one run.
#
#   benches/encoder.sh [DEVICE] [DTYPE] [CONFIG] [BATCH] [SEQ] [STEPS]
#   defaults: cpu f32 benches/configs/modernbert-base.json 2 256 3
#   on an H100: benches/encoder.sh cuda bf16 benches/configs/modernbert-base.json 16 1024 10
#
# EMBER (path of the ember binary) defaults to target/release/ember; HF_ARGS passes extra
# flags to the reference (e.g. "--attn flash_attention_2"). Needs torch + transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
device=${1:-cpu}; dtype=${2:-f32}; cfg=${3:-benches/configs/modernbert-base.json}
batch=${4:-2}; seq=${5:-256}; steps=${6:-3}
ember=${EMBER:-target/release/ember}
out=$(mktemp /tmp/ember-bench-encoder-XXXX.jsonl)
echo "== ember"
"$ember" bench encoder --model-config "$cfg" --batch "$batch" --seq "$seq" --steps "$steps" \
  --warmup 1 --device "$device" --dtype "$dtype" --out "$out" ${EMBER_ARGS:-}
echo "== transformers"
python3 benches/reference/train_mlm_hf.py --model-config "$cfg" --batch "$batch" --seq "$seq" \
  --steps "$steps" --warmup 1 --device "$device" --dtype "$dtype" --out "$out" ${HF_ARGS:-}
echo "== ratio (ember / transformers, MLM training tokens per second)"
python3 - "$out" <<'PY'
import json, sys
rows = {json.loads(l)["engine"]: json.loads(l) for l in open(sys.argv[1])}
e, t = rows["ember"], rows["transformers"]
print(f"ember {e['tokens_per_s']:.0f} tok/s   transformers {t['tokens_per_s']:.0f} tok/s   ratio {e['tokens_per_s'] / t['tokens_per_s']:.2f}x")
PY
