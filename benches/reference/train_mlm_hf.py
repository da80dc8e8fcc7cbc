#!/usr/bin/env python3
"""transformers + PyTorch MLM training steps on the same shape and settings as
`ember bench encoder`: a ModernBertForMaskedLM with random weights from a config.json
(seed 0), random tokens, 30% of them predicted (80% [MASK], 10% random, 10% kept) through
the sparse head (`sparse_prediction=True`: the head runs on the masked positions only),
AdamW (weight decay 0.01), clip_grad_norm_(1.0).

    python3 benches/reference/train_mlm_hf.py --model-config benches/configs/modernbert-base.json \
        --batch 16 --seq 1024 --steps 10 --warmup 3 [--device cuda --dtype bf16] \
        [--attn sdpa|eager|flash_attention_2] [--out results.jsonl]

Prints one row and appends a JSON line like ember's `--out`.
"""

import argparse
import json
import torch
from timing import timed_steps
from transformers import AutoConfig, ModernBertForMaskedLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-config", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    ap.add_argument("--mask-prob", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    peak = a.peak_tflops
    if peak is None and a.device == "cuda" and a.dtype == "bf16":
        peak = 989.0
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    cfg = AutoConfig.from_pretrained(a.model_config)
    cfg.sparse_prediction = True
    torch.manual_seed(0)
    model = ModernBertForMaskedLM._from_config(cfg, dtype=dtype, attn_implementation=a.attn).to(a.device)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    # 6 N per token for the encoder matmuls and the head (counted on every token, as ember
    # counts it) plus 12 L H S for attention without causal halving.
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    matmul = L * (4 * h * h + 3 * h * cfg.intermediate_size) + h * h + cfg.vocab_size * h
    fpt = 6 * matmul + 12 * L * h * a.seq
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01,
                            **({"fused": True} if a.device == "cuda" else {}))
    print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
          f"device {a.device}, dtype {a.dtype}, attn {a.attn}, threads {torch.get_num_threads()}, "
          f"params {params / 1e6:.1f}M")
    g = torch.Generator().manual_seed(1)
    mask_id = cfg.vocab_size - 1

    def step():
        ids = torch.randint(0, cfg.vocab_size - 1, (a.batch, a.seq), generator=g)
        chosen = torch.rand(ids.shape, generator=g) < a.mask_prob
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        u = torch.rand(ids.shape, generator=g)
        inputs = ids.clone()
        inputs[chosen & (u >= 0.2)] = mask_id
        rand = chosen & (u >= 0.1) & (u < 0.2)
        inputs[rand] = torch.randint(0, cfg.vocab_size - 1, (int(rand.sum()),), generator=g)
        loss = model(input_ids=inputs.to(a.device), labels=labels.to(a.device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    losses, secs, peak_gb = timed_steps(step, a.warmup, a.steps, a.device)
    tps = a.batch * a.seq * a.steps / secs
    step_ms = secs * 1e3 / a.steps
    mfu = tps * fpt / (peak * 1e12) if peak else None
    print(f"transformers: {tps:.0f} tokens/s, {step_ms:.1f} ms/step"
          + (f", MFU {100 * mfu:.1f}%" if mfu else "")
          + (f", peak {peak_gb:.1f} GB" if peak_gb else "")
          + f"  (loss {losses[0]:.3f} -> {losses[-1]:.3f})")
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps({"bench": "encoder", "engine": "transformers", "batch": a.batch,
                                "seq": a.seq, "steps": a.steps, "dtype": a.dtype, "device": a.device,
                                "attn": a.attn, "tokens_per_s": tps, "step_ms": step_ms, "mfu": mfu,
                                "peak_mem_gb": peak_gb, "flops_per_token": fpt, "params": params,
                                "loss_first": losses[0], "loss_last": losses[-1]}) + "\n")


if __name__ == "__main__":
    main()
