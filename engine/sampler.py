"""Flow-matching Euler sampler: x_t = (1 - t) x0 + t noise, velocity v = noise - x0, integrated t: 1 -> 0."""
import time

import torch

DEFAULT_STEPS = 25


def timesteps(steps, shift=1.0):
    """steps + 1 times from 1 to 0; shift > 1 spends more steps at high noise (SD3 style)."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def sample(dit, cond, noise, steps=DEFAULT_STEPS, shift=1.0, timer=None):
    """Integrate the DiT's velocity from pure noise to a clean chunk latent [B, W, C, H, W].

    timer: optional dict; its "dit_ms" key accumulates the wall time spent in DiT forwards.
    """
    ts = timesteps(steps, shift)
    x = noise
    b = x.shape[0]
    for i in range(steps):
        t0 = time.perf_counter()
        v = dit(x, ts[i].expand(b), cond)
        if timer is not None:
            timer["dit_ms"] = timer.get("dit_ms", 0.0) + (time.perf_counter() - t0) * 1000
            timer["steps"] = timer.get("steps", 0) + 1
        x = x + (ts[i + 1] - ts[i]) * v
    return x
