"""The timed loop the training references share with `ember bench`: untimed warm-up steps,
then timed ones, with CUDA synchronised at both ends and peak memory counted from the first
timed step."""

import time

import torch


def timed_steps(step, warmup, steps, device):
    """Runs `step()` (returning a detached loss) `warmup` then `steps` times. Returns the
    losses as floats, the timed seconds and the peak GPU memory in GB (None on CPU)."""
    losses = [step() for _ in range(warmup)]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        losses.append(step())
    if device == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    return [float(x) for x in losses], secs, peak_gb
