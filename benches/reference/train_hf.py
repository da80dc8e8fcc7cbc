#!/usr/bin/env python3
"""transformers + PyTorch training steps on the same shape and settings as `ember bench train`:
random weights from a config.json (seed 0), random token batches, AdamW, grad clipping.

    python3 benches/reference/train_hf.py --model-config benches/configs/qwen3-0.6b.json \
        --batch 4 --seq 2048 --steps 10 --warmup 3 [--device cuda --dtype bf16] [--grad-ckpt] [--compile] \
        [--out results.jsonl]

Each step: forward (HF's shifted next-token loss, labels = input_ids), backward,
clip_grad_norm_(1.0), AdamW step, zero_grad(set_to_none=True). Warm-up steps are not timed.
Prints one row and appends a JSON line like ember's `--out`.
"""

import argparse
import json
import torch
from timing import timed_steps
from transformers import AutoConfig, AutoModelForCausalLM


def flops_per_token(model, cfg, seq):
    """PaLM / nanoGPT estimate of training FLOPs per token:

        6 * N + 12 * n_layers * n_heads * head_dim * seq

    N is every parameter except the input embedding, plus the lm_head matmul counted even when
    its weight is tied to the embedding (it is a real hidden x vocab matmul per token). The
    attention term (QK^T and AV, forward + backward) ignores causal masking, as PaLM does."""
    n = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    n -= emb.numel()
    if head is not None and head.weight.data_ptr() == emb.data_ptr():
        n += head.weight.numel()
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return 6 * n + 12 * cfg.num_hidden_layers * n_heads * head_dim * seq, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-config", required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the model (the strongest single-GPU reference)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="accelerator peak for MFU (default: 989 on cuda bf16, H100 dense; none on cpu)")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    peak = a.peak_tflops
    if peak is None and a.device == "cuda" and a.dtype == "bf16":
        peak = 989.0
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    cfg = AutoConfig.from_pretrained(a.model_config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=a.attn).to(a.device)
    model.train()
    if a.grad_ckpt:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    params = sum(p.numel() for p in model.parameters())
    fpt, n_flop_params = flops_per_token(model, cfg, a.seq)
    # Compiled after counting: the compiled wrapper shares the parameters.
    run = torch.compile(model) if a.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1,
                            **({"fused": True} if a.device == "cuda" else {}))
    print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
          f"device {a.device}, dtype {a.dtype}, attn {a.attn}, grad_ckpt {a.grad_ckpt}, compile {a.compile}, "
          f"threads {torch.get_num_threads()}, params {params / 1e6:.1f}M "
          f"(non-embedding incl. lm_head {n_flop_params / 1e6:.1f}M)")
    print(f"{'batch':>6} {'seq':>6} {'steps':>6} {'seconds':>10} {'tokens/s':>12} {'ms/step':>10} "
          f"{'MFU':>7} {'peak_GB':>8} {'loss':>15}")

    g = torch.Generator().manual_seed(1)

    def step():
        ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=g).to(a.device)
        loss = run(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    losses, secs, peak_gb = timed_steps(step, a.warmup, a.steps, a.device)

    tokens = a.batch * a.seq * a.steps
    tps = tokens / secs
    step_ms = secs * 1e3 / a.steps
    mfu = tps * fpt / (peak * 1e12) if peak else None
    mfu_s = f"{mfu * 100:.1f}%" if mfu is not None else "-"
    mem_s = f"{peak_gb:.2f}" if peak_gb is not None else "-"
    print(f"{a.batch:>6} {a.seq:>6} {a.steps:>6} {secs:>10.3f} {tps:>12.1f} {step_ms:>10.1f} "
          f"{mfu_s:>7} {mem_s:>8} {losses[0]:>7.3f}>{losses[-1]:<7.3f}")
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps({"bench": "train", "engine": "transformers", "batch": a.batch, "seq": a.seq,
                                "steps": a.steps, "dtype": a.dtype, "device": a.device, "attn": a.attn,
                                "grad_ckpt": a.grad_ckpt, "compile": a.compile, "tokens_per_s": tps, "step_ms": step_ms,
                                "mfu": mfu, "peak_mem_gb": peak_gb, "flops_per_token": fpt,
                                "params": params, "loss_first": losses[0], "loss_last": losses[-1]}) + "\n")


if __name__ == "__main__":
    main()
