#!/usr/bin/env python3
"""transformers' generate() on the same shape and settings as `ember bench generate`:
random weights from a config.json, greedy, every row forced to the full length, one warm-up.

    python3 benches/reference/generate_hf.py --model-config benches/configs/qwen3-0.6b.json \
        --batch 1,32 --new-tokens 128 --prompt-len 32 [--device cuda --dtype bf16] [--out results.jsonl]

Prints one row per batch size and appends JSON lines like ember's `--out`.
"""

import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-config", required=True)
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    cfg = AutoConfig.from_pretrained(a.model_config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(a.device).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
          f"device {a.device}, dtype {a.dtype}, threads {torch.get_num_threads()}, params {params / 1e6:.1f}M")
    print(f"{'batch':>6} {'new_tok':>8} {'seconds':>10} {'tokens/s':>12} {'ms/step':>10}")
    g = torch.Generator().manual_seed(1)
    for b in [int(x) for x in a.batch.split(",")]:
        ids = torch.randint(0, cfg.vocab_size, (b, a.prompt_len), generator=g).to(a.device)
        kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
            best = float("inf")
            for _ in range(max(1, a.repeat)):
                if a.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = model.generate(ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, **kw)
                if a.device == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
        n = (out.shape[1] - a.prompt_len) * b
        assert n == b * a.new_tokens, (n, b * a.new_tokens)
        tps = n / best
        print(f"{b:>6} {a.new_tokens:>8} {best:>10.3f} {tps:>12.1f} {best * 1e3 / a.new_tokens:>10.2f}")
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps({"bench": "generate", "engine": "transformers", "batch": b,
                                    "new_tokens": a.new_tokens, "prompt_len": a.prompt_len, "seconds": best,
                                    "tokens_per_s": tps, "dtype": a.dtype, "device": a.device,
                                    "params": params}) + "\n")


if __name__ == "__main__":
    main()
