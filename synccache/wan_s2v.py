"""SyncCache on Wan2.2-S2V: diffsynth's real `WanS2VModel`, described from outside (duck typing, no import).

The model (diffsynth/models/wan_video_dit_s2v.py): 40 heavy `WanS2VDiTBlock`s over the tokens
[noisy video (f h w) | reference frame (h w) | motion frames], and after the blocks listed in
`audio_injector.injected_block_id` ({block: injector}; [0, 4, 8, ..., 24, 27, 30, ..., 39] for the 14B)
`after_transformer_block(idx, x)` adds an audio residual to the noisy video tokens only: AdaLN on the
global audio embedding, then `audio_injector.injector[j]` (a cross-attention) per audio frame. So the spans
are the runs of blocks between injections ([0], [1..4], [5..8], ...), the heavy blocks are what SyncCache
bypasses and every injection runs on every step on the current hidden state.

Two ways the model is stepped, both supported:
- `forward(latents, timestep, context, audio_input, motion_latents, pose_cond)` (official style):
  `apply(dit, config)`; the model's forward is the step.
- diffsynth's pipeline never calls forward: its `model_fn_wans2v(dit, ...)` runs the block loop itself.
  `WanS2VStep(dit, fn)` makes any such function a module whose call is one step, and
  `apply_to_pipeline(pipe, config)` puts one in place of a `WanVideoPipeline`'s `model_fn`.
Classifier-free guidance runs as two calls per step (with the audio, then with `0 * audio`): each is a
branch with its own cache state ("positive" / "negative", from the pipeline's `positive` argument, else
from whether the audio is all zeros), so the two passes never trade residuals.

Person weights (the online probe's token weights and calibration's output weight) come from a mask the
user supplies (`person_mask`: [H, W] or [F, H, W], any resolution, 1 on the person/face), area-pooled to
the latent and token grids: weight = background + covered fraction, like the reference model's. The
model has no face mask of its own; without one the weights are uniform.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from synccache.config import SyncCacheConfig
from synccache.hooks import SyncCacheHandle, apply_synccache
from synccache.layout import BlockLayout, LayoutError

BACKGROUND = 0.2  # weight of a token outside the person mask (as the reference model's ChunkCondition)
# positional index of each argument, in forward(...) and in model_fn_wans2v(dit, ...)
_FORWARD_ARGS = ("latents", "timestep", "context", "audio_input", "motion_latents", "pose_cond")
_AUDIO_NAMES = ("audio_embeds", "audio_input")


class WanS2VStep(nn.Module):
    """A function that runs one denoising step of `dit` (diffsynth's model_fn_wans2v, or a pipeline's
    model_fn) as a module, so that a cache's step hooks bracket each call: step(...) == fn(...)."""

    def __init__(self, dit: nn.Module, fn):
        super().__init__()
        self.dit, self.fn = dit, fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _arg(args, kwargs, names):
    """An argument of a forward(...) or model_fn(dit, ...) call, by name or position (None if absent)."""
    for name in names:
        if name in kwargs:
            return kwargs[name]
    offset = 1 if args and isinstance(args[0], nn.Module) else 0  # model_fn(dit, latents, ...)
    for name in names:
        if name in _FORWARD_ARGS and len(args) > offset + _FORWARD_ARGS.index(name):
            return args[offset + _FORWARD_ARGS.index(name)]
    return None


def branch_of(args, kwargs) -> Optional[str]:
    """"positive" or "negative" CFG pass: the pipeline's `positive` argument, else all-zero audio."""
    if "positive" in kwargs:
        return "positive" if kwargs["positive"] else "negative"
    audio = _arg(args, kwargs, _AUDIO_NAMES)
    if not isinstance(audio, torch.Tensor):
        return None
    return "positive" if bool(audio.any()) else "negative"


def _pool(mask: torch.Tensor, size) -> torch.Tensor:
    """[H, W] or [F, H, W] mask -> [1 or F, *size] covered fraction in [0, 1]."""
    m = mask.float()
    m = m[None] if m.dim() == 2 else m
    return F.adaptive_avg_pool2d(m[None], size)[0].clamp(0, 1)


def _check_mask(mask):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3) or min(mask.shape) < 1:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise LayoutError(f"person_mask must be a tensor [H, W] or [F, H, W], got {got}")
    if not bool(torch.isfinite(mask).all()):
        raise LayoutError("person_mask must be finite")
    return mask.detach().cpu()


def injection_order(injector) -> list:
    """[(block, injector index)] of a Wan-S2V audio injector, in injector order; LayoutError if its
    injected_block_id does not number the injectors 0..n-1."""
    order = sorted(injector.injected_block_id.items(), key=lambda kv: kv[1])
    if [j for _, j in order] != list(range(len(injector.injector))):
        raise LayoutError(f"injected_block_id {injector.injected_block_id} does not number "
                          f"the {len(injector.injector)} injectors 0..{len(injector.injector) - 1}")
    return order


def layout(dit: nn.Module, person_mask: Optional[torch.Tensor] = None,
           background: float = BACKGROUND) -> BlockLayout:
    """BlockLayout of a diffsynth WanS2VModel (by duck typing: .blocks, .audio_injector, .patch_size).

    Probe: block 0. Human weight over [noisy video | reference | motion]: background + the person mask's
    covered fraction of each token's patch (per frame for an [F, H, W] mask; the reference frame takes
    the first), motion tokens the smallest weight. Output weight: the same on the latent grid.
    """
    for name in ("blocks", "audio_injector", "patch_size", "after_transformer_block"):
        if not hasattr(dit, name):
            raise LayoutError(f"{type(dit).__name__} has no .{name}; not a diffsynth WanS2VModel")
    inj = dit.audio_injector
    order = injection_order(inj)
    mask = _check_mask(person_mask)
    _, ph, pw = dit.patch_size

    def _latents(args, kwargs):
        lat = _arg(args, kwargs, ("latents",))
        if not isinstance(lat, torch.Tensor) or lat.dim() != 5:
            raise LayoutError("Wan-S2V step was not given latents [B, C, 1 + F, H, W]")
        return lat

    def _frames(frac, n):
        if frac.shape[0] not in (1, n):
            raise LayoutError(f"person_mask has {frac.shape[0]} frames, the step has {n} noisy latent frames")
        return frac.expand(n, -1, -1)

    def human_weight(args, kwargs):
        if mask is None:
            return None
        lat = _latents(args, kwargs)
        b, n, gh, gw = lat.shape[0], lat.shape[2] - 1, lat.shape[3] // ph, lat.shape[4] // pw
        frac = _pool(mask, (gh, gw)).to(lat.device)
        video = _frames(frac, n).flatten()
        w = background + torch.cat([video, frac[0].flatten()])  # [noisy video | reference]
        return w[None].expand(b, -1)

    def output_weight(args, kwargs):
        if mask is None:
            return None
        lat = _latents(args, kwargs)
        n = lat.shape[2] - 1
        frac = _pool(mask, lat.shape[3:]).to(lat.device)
        w = background + torch.cat([frac[:1], _frames(frac, n)])  # [reference | noisy video] frames
        return w[None, None].expand(lat.shape[0], 1, -1, -1, -1)

    return BlockLayout(heavy=list(dit.blocks), audio=[inj.injector[j] for _, j in order],
                       audio_after=[blk for blk, _ in order], probe=0, human_weight=human_weight,
                       output_weight=output_weight, branch=branch_of, weight_prefix=True)


def apply(dit: nn.Module, config: Optional[SyncCacheConfig] = None,
          person_mask: Optional[torch.Tensor] = None) -> SyncCacheHandle:
    """SyncCache on a WanS2VModel stepped by its own forward; reset() the handle per sample."""
    return apply_synccache(dit, config, layout(dit, person_mask))


def apply_step(step: WanS2VStep, config: Optional[SyncCacheConfig] = None,
               person_mask: Optional[torch.Tensor] = None) -> SyncCacheHandle:
    """SyncCache on a WanS2VStep (diffsynth's model_fn_wans2v as a module); reset() per sample."""
    return apply_synccache(step, config, layout(step.dit, person_mask))


class _Restore:
    """Puts a pipeline's model_fn back when the cache is removed (a handle 'hook')."""

    def __init__(self, pipe, fn):
        self.pipe, self.fn = pipe, fn

    def remove(self):
        self.pipe.model_fn = self.fn


def _timestep(kwargs) -> Optional[float]:
    t = kwargs.get("timestep")
    return float(t.flatten()[0]) if isinstance(t, torch.Tensor) and t.numel() else None


def apply_to_pipeline(pipe, config: Optional[SyncCacheConfig] = None,
                      person_mask: Optional[torch.Tensor] = None) -> SyncCacheHandle:
    """SyncCache on a diffsynth WanVideoPipeline running Wan2.2-S2V: one call, `remove()` undoes it.

    The pipeline's model_fn becomes a WanS2VStep; a new sample (a call of the pipeline) is recognised by
    its timestep not falling below the last one of the same branch, and resets the cache.
    """
    dit, fn = getattr(pipe, "dit", None), getattr(pipe, "model_fn", None)
    if not isinstance(dit, nn.Module) or not callable(fn):
        raise LayoutError(f"{type(pipe).__name__} has no .dit module and .model_fn: not a diffsynth "
                          f"WanVideoPipeline")
    if isinstance(fn, WanS2VStep):
        raise RuntimeError("a cache is already applied to this pipeline; remove() it first")
    step = WanS2VStep(dit, fn)
    last = {}  # branch -> last timestep seen
    holder = []

    def new_sample(module, args, kwargs):
        key, t = branch_of(args, kwargs), _timestep(kwargs)
        if t is not None and key in last and t >= last[key] and holder:
            holder[0].reset(keep_stats=True)
            last.clear()
        last[key] = t
    pre = step.register_forward_pre_hook(new_sample, with_kwargs=True)  # runs before the cache's own
    handle = apply_step(step, config, person_mask)
    holder.append(handle)
    handle._hooks += [pre, _Restore(pipe, fn)]
    pipe.model_fn = step
    return handle
