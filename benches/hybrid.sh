#!/usr/bin/env bash
# How training cost grows with sequence length: a Nemotron-Flash-style hybrid against a
# same-width pure-attention Qwen3 (same hidden size, heads and FFN width; the hybrid's
# 8 operators D F M2 F A F M2 F against Qwen3's 4 attention + 4 MLP), forward + backward +
# AdamW on random tokens, one process per run so each peak memory is its own.
#
#   benches/hybrid.sh [DEVICE] [DTYPE] [HYBRID_CONFIG] [QWEN3_CONFIG] [SEQS] [BATCH] [STEPS]
#   defaults: cpu f32 benches/configs/nemotron-flash-tiny.json benches/configs/qwen3-flash-width.json "1024 4096 16384" 1 2
#   on an H100: benches/hybrid.sh cuda bf16 <1B-shaped configs> "1024 4096 16384" 1 5
#
# EMBER (path of the ember binary) defaults to target/release/ember. MEM_LIMIT_KB caps each
# run's address space (default 16 GB), so a run that would exhaust memory fails alone.
set -uo pipefail
cd "$(dirname "$0")/.."
device=${1:-cpu}; dtype=${2:-f32}
hybrid=${3:-benches/configs/nemotron-flash-tiny.json}; dense=${4:-benches/configs/qwen3-flash-width.json}
seqs=${5:-1024 4096 16384}; batch=${6:-1}; steps=${7:-2}
ember=${EMBER:-target/release/ember}
out=$(mktemp /tmp/ember-bench-hybrid-XXXX.jsonl)
for seq in $seqs; do
  for cfg in "$hybrid" "$dense"; do
    echo "== $(basename "$cfg" .json), seq $seq"
    ( ulimit -v "${MEM_LIMIT_KB:-16000000}"; "$ember" bench train --model-config "$cfg" \
        --batch "$batch" --seq "$seq" --steps "$steps" --warmup 1 --device "$device" \
        --dtype "$dtype" --out "$out" ) || echo "   failed (exit $?): out of memory or limit"
  done
done
echo "== tokens/s and peak memory by sequence length"
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'model':>16} {'seq':>6} {'tokens/s':>10} {'ms/step':>10} {'peak GB':>8}")
for r in rows:
    print(f"{r['model_type']:>16} {r['seq']:>6} {r['tokens_per_s']:>10.0f} {r['step_ms']:>10.0f} {r['peak_rss_gb'] or 0:>8.2f}")
PY
