#!/usr/bin/env bash
# The H100 measurements of issue 10, as parts that share one deadline, so that a short device
# lease runs the most important ones first in one call and a time box never loses a log.
#
# On the build machine (no GPU; LLVM 23 from PyPI, as in the book's "GPUs" chapter):
#   bash benches/device-plan.sh build      # CUDA release build with the kernel cache, into gpu/
# On the device machine (gpu/ carried; every part logs to $OUT/PART.log, JSON to $OUT/bench.jsonl):
#   DEADLINE=545 bash benches/device-plan.sh cold profile warm rl kc      # first call
#   DEADLINE=170 bash benches/device-plan.sh hftrain seq8k b256           # second, while warm
#
# Parts (Qwen3-0.6B shape, bf16, random weights):
#   cold     bench train 4 x 2048, 3 steps: the first step is the cold start (compilation, autotune)
#   profile  the same under cubecl's profiler (benches/profile.sh): kernel time per step
#   warm     the same command again: the start with the kernel cache filled by `cold`
#   rl       the issue's RLVR step (64 prompts x G 8, 512 new tokens) against transformers
#   hftrain  transformers' eager training step, same shape
#   cechunk  bench train with the fused loss in 220-row chunks (the CUDA default is 1,766)
#   fblock   bench train with the training attention's key block at FB (default 2048) not 512
#   seq8k    bench train 1 x 8192: does it fit
#   b256     graph decoding at batch 256, then transformers' generate at 256
#   hybrid   nemotron-flash-tiny decoding through the graph (batch 1, 32), then eagerly
#   gemmdev  cuBLASLt ordered on the device (EMBER_GEMM_ORDER=device, stalled on 2026-11-27):
#            bench gemm on one shape under a 30 s box; if it passes, a training step with it
#   kc       the kernel cache's size, packed into $OUT when it is small enough to come back
set -u
cd "$(dirname "$0")/.."
if [ "${1:-}" = build ]; then
  set -e
  llvm=${EMBER_LLVM_DIR:-$HOME/.cache/ember-llvm}
  tracel="${XDG_DATA_HOME:-$HOME/.local/share}/tracel/tracel-llvm-23.1.0-4"
  if [ ! -e "$tracel/.tracel-llvm-installed" ]; then
    pip install -q --no-deps --target "$llvm" \
      mlc-llvm-static==23.1.1.post0 mlc-llvm-static-extra-targets==23.1.1.post0
    mkdir -p "$(dirname "$tracel")"
    ln -sfn "$llvm/mlc_llvm_static/static" "$tracel"
    touch "$tracel/.tracel-llvm-installed"
  fi
  target=${CUDA_TARGET_DIR:-$HOME/.cache/ember-cuda-target}
  CARGO_TARGET_DIR=$target CUDARC_CUDA_VERSION=13000 cargo build --release \
    --no-default-features --features flex,cuda,kernel-cache --bin ember
  mkdir -p gpu
  strip -o /tmp/ember-c "$target/release/ember"
  xz -6 -T0 -c /tmp/ember-c > gpu/ember-c.xz
  git rev-parse --short HEAD > gpu/ember-c.commit
  git diff --quiet HEAD || echo "warning: the tree has uncommitted changes; gpu/ember-c.commit understates them"
  ls -l gpu/ember-c.xz
  exit
fi
start=$SECONDS; deadline=${DEADLINE:-560}
left() { echo $(( deadline - (SECONDS - start) )); }
E=/tmp/ember
if [ ! -x $E ]; then
  python3 -c "import lzma,shutil;shutil.copyfileobj(lzma.open('gpu/ember-c.xz'),open('$E','wb'))" && chmod +x $E
  echo "ember $(cat gpu/ember-c.commit)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch,transformers;print('torch',torch.__version__,'transformers',transformers.__version__)"
fi
export EMBER=$E EMBER_KERNEL_CACHE=/tmp/kc PYTHONUNBUFFERED=1
out=${OUT:-/tmp/ember-device}; mkdir -p "$out"
J=$out/bench.jsonl
C=$PWD/benches/configs/qwen3-0.6b.json
H=$PWD/benches/configs/nemotron-flash-tiny.json
T="bench train --model-config $C --batch 4 --seq 2048 --device cuda --dtype bf16"
G="bench generate --device cuda --dtype bf16 --graph --no-check"
# NAME CAP CMD...: CMD under min(CAP, the time left less 5 s), its output also in $out/NAME.log.
run() {
  local name=$1 cap=$2; shift 2
  local l=$(( $(left) - 5 )); [ $l -gt "$cap" ] && l=$cap
  if [ $l -lt 15 ]; then echo "== $name: skipped ($l s left)"; return 124; fi
  echo "== $name (cap ${l}s) $(date +%T)"
  local t0=$SECONDS
  timeout -k 5 $l "$@" > >(tee "$out/$name.log") 2>&1
  local rc=$?
  echo "== $name: rc $rc in $(( SECONDS - t0 )) s; GPU memory used $(nvidia-smi --query-gpu=memory.used --format=csv,noheader)"
  return $rc
}
for part in "$@"; do case $part in
  cold) run cold 240 $E $T --steps 3 --warmup 1 --out "$J" ;;
  profile) run profile 150 env OUT="$out" bash benches/profile.sh train steady:2 $E $T --steps 3 --warmup 1 ;;
  warm) run warm 60 $E $T --steps 2 --warmup 1 --out "$J" ;;
  rl) run rl 400 env TRAIN=1 MICRO=32 bash benches/rollout.sh cuda bf16 "$C" 64 8 512 64 ;;
  hftrain) run hftrain 90 python3 benches/reference/train_hf.py --model-config "$C" --batch 4 \
             --seq 2048 --steps 5 --warmup 2 --device cuda --dtype bf16 --out "$J" ;;
  cechunk) run cechunk 90 env EMBER_CE_CHUNK_ROWS=220 $E $T --steps 3 --warmup 1 --out "$J" ;;
  fblock) run fblock 120 env EMBER_FLASH_BLOCK="${FB:-2048}" $E $T --steps 3 --warmup 1 --out "$J" ;;
  seq8k) run seq8k 150 $E bench train --model-config "$C" --batch 1 --seq 8192 --device cuda \
           --dtype bf16 --steps 2 --warmup 1 --out "$J" ;;
  b256) run b256 120 $E $G --model-config "$C" --batch 256 --new-tokens 64 --bandwidth-gbs 3350 --out "$J"
        run b256hf 90 python3 benches/reference/generate_hf.py --model-config "$C" --batch 256 \
          --new-tokens 64 --device cuda --dtype bf16 --out "$J" ;;
  hybrid) run hybrid 120 $E $G --model-config "$H" --batch 1,32 --new-tokens 64 --out "$J"
          run hybrideager 60 $E bench generate --model-config "$H" --batch 1 --new-tokens 16 \
            --device cuda --dtype bf16 --step-times --out "$J" ;;
  gemmdev) run gemmdev 30 env EMBER_GEMM=cublaslt EMBER_GEMM_ORDER=device $E bench gemm --device cuda \
             --dtype bf16 --shapes "8192,2048,1024;8192,1024,1024" --repeat 3 --check \
           && run gemmdevtrain 150 env EMBER_GEMM=cublaslt EMBER_GEMM_ORDER=device $E $T --steps 3 --warmup 1 --out "$J" ;;
  kc) du -sh /tmp/kc; XZ_OPT=-T0 timeout 30 tar -C /tmp -cJf "$out/kc.tar.xz" kc; ls -l "$out/kc.tar.xz" ;;
  *) echo "unknown part $part" ;;
esac; done
echo "== done at $(( SECONDS - start )) s"
