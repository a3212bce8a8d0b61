"""The probe's distance: relative L1 change with per-token weights emphasising the human region."""
from typing import Optional

import torch


def weighted_rel_l1(cur: torch.Tensor, ref: torch.Tensor, weight: Optional[torch.Tensor] = None) -> float:
    """sum_bn w * mean_d |cur - ref| / sum_bn w * mean_d |ref| for [B, L, D] states and weight [B, L]."""
    diff = (cur - ref).abs().float().mean(-1)  # [B, L]
    base = ref.abs().float().mean(-1)  # [B, L]
    if weight is not None:
        w = weight.to(diff.device, torch.float32)
        diff, base = diff * w, base * w
    return float(diff.sum() / base.sum().clamp_min(1e-12))
