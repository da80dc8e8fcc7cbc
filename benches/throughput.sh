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
#   GEN_BATCHES=1,32,256 NEW_TOKENS=128 PROFILE_TOKENS=32  RL_PROMPTS=64 RL_GROUP=8 RL_NEW=512 RL_MICRO=8
#   BUDGET_S=540 (the whole run)  EMBER (the binary; default target/release/ember)
#   PARTS=all, or a comma list of: gemm (cuBLASLt beside Burn's matmul, checked), train
#   (ember's step and its warm start), torch (both training references), generate, rl, long,
#   profile, graph (generation through a captured decode graph)
#   EMBER_GEMM=cublaslt sends ember's projections to cuBLASLt (CUDA builds; found below)
#   EMBER_DECODE=eager keeps ember's RL rollouts off the captured decode step (the CUDA default)
#   TRAIN_GRAPH=1 goes on training through a captured step after ember's eager steps and
#   times it too (`bench train --graph`; Burn's matmul, since cuBLASLt is not recorded)
# On an H100 (2026-11-26) ember's first 0.6B training step took 115 s of kernel compilation,
# so all parts need more than one 15-minute device session: choose PARTS to fit one.
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
dir=${OUT:-$(mktemp -d /tmp/ember-throughput-XXXX)}; mkdir -p "$dir"
out="$dir/throughput.jsonl"; : >"$out"
start=$(date +%s); budget=${BUDGET_S:-540}
# A fresh kernel cache, so that the first ember run below is a cold start (builds with the
# `kernel-cache` feature; others ignore it and both starts are cold).
export EMBER_KERNEL_CACHE="$dir/kernel-cache"
rm -rf "$EMBER_KERNEL_CACHE"

# cuBLASLt for EMBER_GEMM=cublaslt: the one the PyTorch wheels bring, else the toolkit's.
ltdir=$(python3 -c '
import glob, os, sys
c = [p for d in sys.path if d for p in glob.glob(os.path.join(d, "nvidia", "**", "libcublasLt.so*"), recursive=True)]
c += glob.glob("/usr/local/cuda*/lib64/libcublasLt.so*") + glob.glob("/usr/local/cuda*/targets/*/lib/libcublasLt.so*")
print(os.path.dirname(c[0]) if c else "")' 2>/dev/null)
[[ -n $ltdir ]] && export LD_LIBRARY_PATH="$ltdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# want GROUP: whether PARTS asks for GROUP.
want() { [[ ,${PARTS:-all}, == *,all,* || ,${PARTS:-all}, == *,$1,* ]]; }

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
# 0. cuBLASLt against Burn's matmul on the model's GEMM shapes: a difference past the
# tolerance fails the part.
[[ $device == cuda ]] && want gemm && part gemm 120 "$ember" bench gemm --device "$device" --dtype "$dtype" --check
tb=${TRAIN_BATCH:-4}; ts=${TRAIN_SEQ:-2048}; steps=${STEPS:-10}
# 1. Training. The first ember process compiles every kernel: its first step is the cold
# start; the short second process below reads them back from the cache: the warm start.
want train && part train-ember 240 "$ember" bench train "${common[@]}" --batch "$tb" --seq "$ts" --steps "$steps" --warmup 2 \
  ${TRAIN_GRAPH:+--graph}
want train && part start-warm 120 "$ember" bench train "${common[@]}" --batch "$tb" --seq "$ts" --steps 1 --warmup 1
want torch && part train-torch 60 python3 benches/reference/train_hf.py "${common[@]}" --batch "$tb" --seq "$ts" --steps "$steps"
want torch && part train-torch-compile 130 python3 benches/reference/train_hf.py "${common[@]}" --batch "$tb" --seq "$ts" --steps "$steps" --compile
# 2. Generation.
gb=${GEN_BATCHES:-1,32,256}; nt=${NEW_TOKENS:-128}
want generate && part generate-ember 60 "$ember" bench generate "${common[@]}" --batch "$gb" --new-tokens "$nt" \
  ${BANDWIDTH_GBS:+--bandwidth-gbs "$BANDWIDTH_GBS"}
# The same through the decode step captured as a CUDA graph (greedy). Not checked against
# the eager engine here, which took over a second a token on an H100 (tests check it).
want graph && part generate-graph 90 "$ember" bench generate "${common[@]}" --batch "$gb" --new-tokens "$nt" \
  --graph --no-check ${BANDWIDTH_GBS:+--bandwidth-gbs "$BANDWIDTH_GBS"}
want generate && part generate-torch 70 python3 benches/reference/generate_hf.py "${common[@]}" --batch "$gb" --new-tokens "$nt"
# 3. One RLVR step: G completions of each prompt, then one update on them.
rl=(--prompts "${RL_PROMPTS:-64}" --group "${RL_GROUP:-8}" --new-tokens "${RL_NEW:-512}" --prompt-len 64
    --train --micro "${RL_MICRO:-8}")
want rl && part rl-ember 300 "$ember" bench rollout "${common[@]}" "${rl[@]}"
want rl && part rl-torch 90 python3 benches/reference/rollout_hf.py "${common[@]}" "${rl[@]}"
# 4. A long sequence: batch 1 must fit.
ls=${LONG_SEQ:-8192}
want long && part long-ember 70 "$ember" bench train "${common[@]}" --batch 1 --seq "$ls" --steps 2 --warmup 1
want long && part long-torch 40 python3 benches/reference/train_hf.py "${common[@]}" --batch 1 --seq "$ls" --steps 2 --warmup 1
# 5. Where the time goes: per-kernel GPU time of training, over the last two of five steps
# (found as the log's repeating tail, so no compilation probe or autotune candidate is in
# it; the first step took 125 s on an H100), and of decoding at batch 1, prefill included
# (cubecl backends only; tables in $dir/profile-*.md).
if [[ $device != cpu ]]; then
  root=$(pwd); abs=(--model-config "$root/$cfg" --device "$device" --dtype "$dtype")
  [[ $ember = /* ]] || ember="$root/$ember"
  want profile && part profile-train 220 benches/profile.sh train steady:2 "$ember" bench train "${abs[@]}" --batch "$tb" --seq "$ts" --steps 4 --warmup 1
  want profile && part profile-decode 40 benches/profile.sh decode "${PROFILE_TOKENS:-32}" "$ember" bench generate "${abs[@]}" --batch 1 --new-tokens "${PROFILE_TOKENS:-32}"
fi

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
    t = [r for r in gen if r["batch"] == b and r["engine"] == "transformers"]
    for engine in ("ember", "ember-graph"):
        e = [r for r in gen if r["batch"] == b and r["engine"] == engine]
        if e and t:
            bw = f", {100 * e[0]['bandwidth_fraction']:.1f}% of the bandwidth bound" if e[0].get("bandwidth_fraction") else ""
            agree = f", {100 * e[0]['rows_agreeing_with_eager']:.0f}% of rows agree with eager" if "rows_agreeing_with_eager" in e[0] else ""
            print(f"generate batch {b}: {engine} {e[0]['tokens_per_s']:.1f} tok/s{bw}{agree}; transformers {t[0]['tokens_per_s']:.1f} ({e[0]['tokens_per_s'] / t[0]['tokens_per_s']:.2f}x)")
for engine in ("ember", "transformers"):
    r = next((r for r in rows if r.get("bench") == "rollout" and r.get("engine") == engine), None)
    if r:
        parts = ", ".join(f"{k} {r[k]:.1f}" for k in ("rollout_s", "train_s", "step_s") if k in r)
        how = f" ({r['decode']} decoding)" if "decode" in r else ""
        print(f"rl step {engine}{how}: {parts}")
PY
