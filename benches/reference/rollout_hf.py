#!/usr/bin/env python3
"""The TRL-style reference for `ember bench rollout`: transformers' generate() sampling G
completions per prompt (num_return_sequences, as TRL's GRPOTrainer does without vLLM), every
row forced to the full length, then with --train one GRPO update on them: per-token log-probs
recomputed at the sampling temperature, the clipped surrogate (eps 0.2 / 0.28, token-level
mean, advantages +1/-1 alternating), backward in micro-batches, clip_grad_norm_(1.0) and
AdamW. Random weights from a config.json, one warm-up.

    python3 benches/reference/rollout_hf.py --model-config benches/configs/qwen3-0.6b.json \
        --prompts 64 --group 8 --new-tokens 512 --prompt-len 64 [--train --micro 8] \
        [--device cuda --dtype bf16] [--out results.jsonl]
"""

import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-config", required=True)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--out")
    a = ap.parse_args()
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    cfg = AutoConfig.from_pretrained(a.model_config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(a.device)
    params = sum(p.numel() for p in model.parameters())
    print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
          f"device {a.device}, dtype {a.dtype}, threads {torch.get_num_threads()}, params {params / 1e6:.1f}M")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (a.prompts, a.prompt_len), generator=g).to(a.device)
    kw = dict(do_sample=True, temperature=a.temperature, top_k=0, top_p=1.0,
              num_return_sequences=a.group, eos_token_id=None, pad_token_id=0)
    model.eval()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
        sync(a.device)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, **kw)
        sync(a.device)
        rollout_s = time.perf_counter() - t0
    rows = out.shape[0]
    new = (out.shape[1] - a.prompt_len) * rows
    assert new == a.prompts * a.group * a.new_tokens, (new, out.shape)
    rec = {"bench": "rollout", "engine": "transformers", "prompts": a.prompts, "group": a.group,
           "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "dtype": a.dtype,
           "device": a.device, "params": params, "rollout_s": rollout_s,
           "rollout_tokens_per_s": new / rollout_s}
    print(f"rollout: {rows} completions, {new} new tokens in {rollout_s:.2f} s: {new / rollout_s:.0f} tokens/s")
    if a.train:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=a.device == "cuda")
        # The sampler's log-probs, as TRL keeps them (old_per_token_logps) for the ratio.
        with torch.no_grad():
            old = []
            for part in out.split(max(1, rows // a.micro)):
                logits = model(part).logits[:, a.prompt_len - 1:-1].float() / a.temperature
                old.append(torch.log_softmax(logits, -1).gather(-1, part[:, a.prompt_len:, None])[..., 0])
            old = torch.cat(old)
        sync(a.device)
        adv = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(rows)], device=a.device)
        total = rows * a.new_tokens

        def update():
            opt.zero_grad(set_to_none=True)
            step = max(1, rows // a.micro)
            for s in range(0, rows, step):
                part = out[s:s + step]
                logits = model(part).logits[:, a.prompt_len - 1:-1].float() / a.temperature
                logp = torch.log_softmax(logits, -1).gather(-1, part[:, a.prompt_len:, None])[..., 0]
                ratio = (logp - old[s:s + step]).exp()
                A = adv[s:s + step, None]
                loss = -torch.min(ratio * A, ratio.clamp(0.8, 1.28) * A).sum() / total
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sync(a.device)

        # Untimed first update, as ember's bench does: allocator growth and library setup.
        t0 = time.perf_counter()
        update()
        print(f"update warm-up: {time.perf_counter() - t0:.2f} s")
        t0 = time.perf_counter()
        update()
        train_s = time.perf_counter() - t0
        trained = rows * out.shape[1]
        print(f"update: {trained} tokens forward+backward in {a.micro} micro-batches, clip, AdamW: "
              f"{train_s:.2f} s ({trained / train_s:.0f} tokens/s); the old-log-prob pass is not timed")
        print(f"RL step: {rollout_s + train_s:.2f} s ({100 * rollout_s / (rollout_s + train_s):.0f}% rollout)")
        rec.update(train_s=train_s, step_s=rollout_s + train_s, micro=a.micro)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
