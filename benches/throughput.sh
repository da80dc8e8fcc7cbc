#!/usr/bin/env bash
# Issue 10's measurements in one run, ember and the PyTorch reference side by side on the
# same machine: training (eager and torch.compile references), a long-sequence step,
# generation at several batch sizes, an RLVR step split into rollout and update, and the
# cold and warm start of a CUDA run (the persistent kernel cache). Every part is time-boxed
# under one overall budget, so that the whole fits a short device session; a part that
# runs out of time is reported as such and the rest still run.
#
#   benches/throughput.sh [DEVICE] [DTYPE]          defaults: cuda bf16
#
# Sizes, from the environment (defaults: the issue's, for an H100):
#   CONFIG=benches/configs/qwen3-0.6b.json  TRAIN_BATCH=4 TRAIN_SEQ=2048 LONG_SEQ=8192 STEPS=10
#   GEN_BATCHES=1,32,256 NEW_TOKENS=128  RL_PROMPTS=64 RL_GROUP=8 RL_NEW=512 RL_MICRO=8
#   BUDGET_S=540 (the whole run)  EMBER (the binary; default target/release/ember)
# A smoke run on a CPU:
#   CONFIG=benches/configs/qwen3-tiny.json TRAIN_BATCH=1 TRAIN_SEQ=128 LONG_SEQ=256 STEPS=2 \
#   GEN_BATCHES=1,2 NEW_TOKENS=8 RL_PROMPTS=2 RL_GROUP=2 RL_NEW=8 benches/throughput.sh cpu f32
#
# Everything lands in one JSONL (in $OUT when set, as on the device machine) and a summary
# with the ratios is printed at the end. Needs torch and transformers.
set -uo pipefail
cd "$(dirname "$0")/.."
device=${1:-cuda}; dtype=${2:-bf16}
cfg=${CONFIG:-benches/configs/qwen3-0.6b.json}
ember=${EMBER:-target/release/ember}
dir=${OUT:-$(mktemp -d /tmp/ember-throughput-XXXX)}
out="$dir/throughput.jsonl"; : >"$out"
start=$(date +%s); budget=${BUDGET_S:-540}
# A fresh kernel cache, so that the first ember run below is a cold start.
export EMBER_KERNEL_CACHE="$dir/kernel-cache"
rm -rf "$EMBER_KERNEL_CACHE"

# part NAME CAP_S COMMAND...: runs COMMAND for at most CAP_S seconds and at most what is left
# of the budget, logging to $dir/NAME.log and noting a timeout or failure in the JSONL.
part() {
  local name=$1 cap=$2; shift 2
  local left=$(( budget - ($(date +%s) - start) ))
  (( cap > left )) && cap=$left
  if (( cap < 10 )); then
    echo "== $name: skipped, the budget is spent"
    echo "{\"bench\": \"$name\", \"status\": \"skipped\"}" >>"$out"
    return
  fi
  echo "== $name (at most ${cap}s)"
  local t0; t0=$(date +%s.%N)
  timeout "$cap" "$@" 2>&1 | tee "$dir/$name.log" | grep -v '^step [0-9]*/'
  local rc=${PIPESTATUS[0]}
  local wall; wall=$(python3 -c "import time; print(round(time.time() - $t0, 1))")
  local status=ok; (( rc == 124 )) && status=timeout; (( rc != 0 && rc != 124 )) && status="exit $rc"
  echo "{\"bench\": \"$name\", \"status\": \"$status\", \"wall_s\": $wall}" >>"$out"
}

common=(--model-config "$cfg" --device "$device" --dtype "$dtype" --out "$out")
tb=${TRAIN_BATCH:-4}; ts=${TRAIN_SEQ:-2048}; steps=${STEPS:-10}
# 1. Training. The first ember process compiles every kernel: its first step is the cold
# start; the short second process below reads them back from the cache: the warm start.
part train-ember 200 "$ember" bench train "${common[@]}" --batch "$tb" --seq "$ts" --steps "$steps" --warmup 2
part start-warm 60 "$ember" bench train "${common[@]}" --batch "$tb" --seq "$ts" --steps 1 --warmup 1
part train-torch 90 python3 benches/reference/train_hf.py "${common[@]}" --batch "$tb" --seq "$ts" --steps "$steps"
part train-torch-compile 180 python3 benches/reference/train_hf.py "${common[@]}" --batch "$tb" --seq "$ts" --steps "$steps" --compile
# 2. Generation.
gb=${GEN_BATCHES:-1,32,256}; nt=${NEW_TOKENS:-128}
part generate-ember 90 "$ember" bench generate "${common[@]}" --batch "$gb" --new-tokens "$nt" \
  ${BANDWIDTH_GBS:+--bandwidth-gbs "$BANDWIDTH_GBS"}
part generate-torch 120 python3 benches/reference/generate_hf.py "${common[@]}" --batch "$gb" --new-tokens "$nt"
# 3. One RLVR step: G completions of each prompt, then one update on them.
rl=(--prompts "${RL_PROMPTS:-64}" --group "${RL_GROUP:-8}" --new-tokens "${RL_NEW:-512}" --prompt-len 64
    --train --micro "${RL_MICRO:-8}")
part rl-ember 150 "$ember" bench rollout "${common[@]}" "${rl[@]}"
part rl-torch 150 python3 benches/reference/rollout_hf.py "${common[@]}" "${rl[@]}"
# 4. A long sequence: batch 1 must fit.
ls=${LONG_SEQ:-8192}
part long-ember 120 "$ember" bench train "${common[@]}" --batch 1 --seq "$ls" --steps 2 --warmup 1
part long-torch 60 python3 benches/reference/train_hf.py "${common[@]}" --batch 1 --seq "$ls" --steps 2 --warmup 1

echo "== summary ($(( $(date +%s) - start )) s in all; every record in $out)"
python3 - "$out" "$dir" <<'PY'
import json, re, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def find(bench, engine, **kv):
    for r in rows:
        if r.get("bench") == bench and r.get("engine") == engine and all(r.get(k) == v for k, v in kv.items()):
            return r
status = {r["bench"]: r for r in rows if "status" in r}
for name, r in status.items():
    if r["status"] != "ok":
        print(f"{name}: {r['status']}")
train = [r for r in rows if r.get("bench") == "train"]
if train:
    seqs = sorted({r["seq"] for r in train})
    for seq in seqs:
        e = [r for r in train if r["seq"] == seq and r["engine"] == "ember"]
        t = {bool(r.get("compile")): r for r in train if r["seq"] == seq and r["engine"] == "transformers"}
        for x in e[:1]:
            mfu = f", MFU {100 * x['mfu']:.1f}%" if x.get("mfu") else ""
            line = f"train seq {seq}: ember {x['tokens_per_s']:.0f} tok/s{mfu}"
            for compiled, r in sorted(t.items()):
                name = "torch.compile" if compiled else "eager"
                line += f"; {name} {r['tokens_per_s']:.0f} tok/s ({x['tokens_per_s'] / r['tokens_per_s']:.2f}x)"
            print(line)
def first_step(log):
    try:
        m = re.search(r"first step \(includes compilation\): ([0-9.]+) s", open(f"{sys.argv[2]}/{log}.log").read())
        return float(m.group(1)) if m else None
    except OSError:
        return None
cold, warm = first_step("train-ember"), first_step("start-warm")
if cold is not None and warm is not None:
    print(f"start: first training step {cold:.1f} s with an empty kernel cache, {warm:.1f} s with it filled")
gen = [r for r in rows if r.get("bench") == "generate"]
for b in sorted({r["batch"] for r in gen}):
    e = [r for r in gen if r["batch"] == b and r["engine"] == "ember"]
    t = [r for r in gen if r["batch"] == b and r["engine"] == "transformers"]
    if e and t:
        bw = f", {100 * e[0]['bandwidth_fraction']:.1f}% of the bandwidth bound" if e[0].get("bandwidth_fraction") else ""
        print(f"generate batch {b}: ember {e[0]['tokens_per_s']:.1f} tok/s{bw}; transformers {t[0]['tokens_per_s']:.1f} ({e[0]['tokens_per_s'] / t[0]['tokens_per_s']:.2f}x)")
for engine in ("ember", "transformers"):
    r = next((r for r in rows if r.get("bench") == "rollout" and r.get("engine") == engine), None)
    if r:
        parts = ", ".join(f"{k} {r[k]:.1f}" for k in ("rollout_s", "train_s", "step_s") if k in r)
        print(f"rl step {engine}: {parts}")
PY
