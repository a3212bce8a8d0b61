"""SyncCache's distances: relative L1 change, plain, weighted per token (the online probe) or weighted per
element (calibration's output error). Peers and calibration use the same ones."""
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


def rel_l1(cur: torch.Tensor, ref: torch.Tensor) -> float:
    """mean |cur - ref| / mean |ref|, in float32."""
    cur, ref = cur.float(), ref.float()
    return float((cur - ref).abs().mean() / ref.abs().mean().clamp_min(1e-12))


def output_rel_l1(cur: torch.Tensor, ref: torch.Tensor, weight=None) -> float:
    """sum(w |cur - ref|) / sum(w |ref|), w broadcast to the tensors; weight None: rel_l1 exactly."""
    if weight is None:
        return rel_l1(cur, ref)
    w = weight.to(cur.device, torch.float32)
    return float((w * (cur - ref).abs().float()).sum() / (w * ref.abs().float()).sum().clamp_min(1e-12))
