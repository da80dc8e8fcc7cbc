#!/usr/bin/env bash
# Side-by-side RL benchmark: ember and a TRL-style transformers loop, same shape, same
# machine, one run: sampling G completions for each prompt, then (with TRAIN=1) one GRPO
# update on them.
#
#   benches/rollout.sh [DEVICE] [DTYPE] [CONFIG] [PROMPTS] [GROUP] [NEW_TOKENS] [PROMPT_LEN]
#   defaults: cpu f32 benches/configs/qwen3-tiny.json 64 8 512 64
#   on the GPU box: TRAIN=1 benches/rollout.sh cuda bf16 benches/configs/qwen3-0.6b.json
#
# EMBER (path of the ember binary) defaults to target/release/ember. Needs torch + transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
device=${1:-cpu}; dtype=${2:-f32}; cfg=${3:-benches/configs/qwen3-tiny.json}
prompts=${4:-64}; group=${5:-8}; new=${6:-512}; plen=${7:-64}
ember=${EMBER:-target/release/ember}
out=$(mktemp /tmp/ember-rollout-XXXX.jsonl)
train=(); [ "${TRAIN:-0}" = 1 ] && train=(--train --micro "${MICRO:-8}")
args=(--model-config "$cfg" --prompts "$prompts" --group "$group" --new-tokens "$new"
      --prompt-len "$plen" --device "$device" --dtype "$dtype" --out "$out" "${train[@]}")
echo "== ember"
"$ember" bench rollout "${args[@]}"
echo "== transformers"
python3 benches/reference/rollout_hf.py "${args[@]}"
echo "== ratio (ember / transformers)"
python3 - "$out" <<'PY'
import json, sys
r = {x["engine"]: x for x in map(json.loads, open(sys.argv[1]))}
e, t = r["ember"], r["transformers"]
print(f"rollout: ember {e['rollout_tokens_per_s']:.0f} tok/s, transformers {t['rollout_tokens_per_s']:.0f} tok/s: {e['rollout_tokens_per_s'] / t['rollout_tokens_per_s']:.2f}x")
if "step_s" in e and "step_s" in t:
    print(f"update: ember {e['train_s']:.2f} s, transformers {t['train_s']:.2f} s: {t['train_s'] / e['train_s']:.2f}x")
    print(f"RL step: ember {e['step_s']:.2f} s, transformers {t['step_s']:.2f} s: {t['step_s'] / e['step_s']:.2f}x faster")
PY
