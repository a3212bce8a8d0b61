"""Flow-matching Euler sampler: x_t = (1 - t) x0 + t noise, velocity v = noise - x0, integrated t: 1 -> 0.

Classifier-free guidance on the audio: the condition holds every sample twice, [with audio; null audio]
(AvatarDiT.prepare(..., null_audio=True)), both run in one batched forward, and the velocity is pushed
away from the audio-free one: v = v_null + g * (v_audio - v_null). On this CPU the batch of two costs
about 1.3x one forward, not 2x.
"""
import time

import torch

from engine.config import ModelConfig

# the model's sampling defaults have one home, engine/config.py's ModelConfig (configs/default.toml sets them)
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_NOISE_SCALE = ModelConfig.steps, ModelConfig.guidance, ModelConfig.noise_scale


def timesteps(steps, shift=1.0):
    """steps + 1 times from 1 to 0; shift > 1 spends more steps at high noise (SD3 style)."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def sample(dit, cond, noise, steps=DEFAULT_STEPS, shift=1.0, timer=None, guidance=1.0):
    """Integrate the DiT's velocity from noise to a clean chunk latent [B, W, C, H, W].

    guidance: 1.0 = plain conditional sampling with a batch-B cond; otherwise cond must have batch 2B
    ([audio; null audio]). timer: optional dict; "dit_ms" accumulates the wall time in DiT forwards and
    "steps" counts them.
    """
    ts = timesteps(steps, shift)
    x = noise
    b = x.shape[0]
    guided = guidance != 1.0
    for i in range(steps):
        t0 = time.perf_counter()
        if guided:
            v_audio, v_null = dit(torch.cat([x, x]), ts[i].expand(2 * b), cond).chunk(2)
            v = v_null + guidance * (v_audio - v_null)
        else:
            v = dit(x, ts[i].expand(b), cond)
        if timer is not None:
            timer["dit_ms"] = timer.get("dit_ms", 0.0) + (time.perf_counter() - t0) * 1000
            timer["steps"] = timer.get("steps", 0) + 1
        x = x + (ts[i + 1] - ts[i]) * v
    return x
