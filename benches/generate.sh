#!/usr/bin/env bash
# Side-by-side generation benchmark: ember and transformers, same shape, same machine, one run.
#
#   benches/generate.sh [DEVICE] [DTYPE] [BATCHES] [NEW_TOKENS]
#   defaults: cpu f32 1,32 128      (on the GPU box: benches/generate.sh cuda bf16)
#
# EMBER (path of the ember binary) defaults to target/release/ember. Needs torch + transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
device=${1:-cpu}; dtype=${2:-f32}; batches=${3:-1,32}; new=${4:-128}
ember=${EMBER:-target/release/ember}
cfg=benches/configs/qwen3-0.6b.json
out=$(mktemp /tmp/ember-bench-XXXX.jsonl)
extra=()
[ -n "${BANDWIDTH_GBS:-}" ] && extra=(--bandwidth-gbs "$BANDWIDTH_GBS")
echo "== ember"
"$ember" bench generate --model-config "$cfg" --batch "$batches" --new-tokens "$new" \
  --device "$device" --dtype "$dtype" --out "$out" "${extra[@]}"
echo "== transformers"
python3 benches/reference/generate_hf.py --model-config "$cfg" --batch "$batches" --new-tokens "$new" \
  --device "$device" --dtype "$dtype" --out "$out"
echo "== ratio (ember / transformers, new tokens per second)"
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault(r["batch"], {})[r["engine"]] = r["tokens_per_s"]
for b, e in sorted(by.items()):
    print(f"batch {b:>3}: ember {e['ember']:9.1f} tok/s   transformers {e['transformers']:9.1f} tok/s   ratio {e['ember'] / e['transformers']:.2f}x")
PY
