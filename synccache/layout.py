"""Describe a model's blocks from outside: heavy visual blocks, audio blocks, the probe, the human weight,
and the output weight by which calibration prices reuse errors.

Like cache-dit's BlockAdapter, nothing here changes the model: a `BlockLayout` only lists which modules
play which role, so the hooks can find them. `reference_layout` builds one for engine's AvatarDiT by
duck typing (this package never imports engine/).
"""
import operator
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence

import torch
import torch.nn as nn

# human_weight(args, kwargs) -> [B, L] per-token weight for the heavy blocks' sequence, or None (uniform).
# It receives the positional and keyword arguments of the model's forward for the current step.
WeightFn = Callable[[tuple, dict], Optional[torch.Tensor]]
# output_weight(args, kwargs) -> per-sample weight on the model's output (a tensor with the output's number
# of dimensions, the batch size first, every other size 1 or the output's), or None (uniform).


def _is_index(v, n) -> bool:
    """True if v is an integer in [0, n)."""
    try:
        return 0 <= operator.index(v) < n
    except TypeError:
        return False


class LayoutError(ValueError):
    """A BlockLayout that does not describe the model consistently."""


def hidden_state(i, args, kwargs) -> torch.Tensor:
    """The hidden-state tensor heavy block i was called with: its first argument, or hidden_states= / x=."""
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
    if not isinstance(x, torch.Tensor):
        raise LayoutError(f"heavy block {i} was not given a hidden-state tensor as its first argument")
    return x


@dataclass
class BlockLayout:
    """Roles of a model's blocks, in execution order.

    heavy: the heavy visual blocks, in the order the model runs them; each takes the hidden state
      [B, L, D] as its first argument and returns a tensor of the same shape.
    audio: the audio blocks; audio[i] runs after heavy[audio_after[i]] (several may follow one block).
    probe: index of the heavy block whose output is the probe; heavy[0..probe] always run when probing.
    human_weight: per-token weight emphasising the person for the current sample (None: uniform).
    output_weight: per-sample weight on the model's output, by which calibration (SpanErrorRecorder)
      weighs the error of a reuse, e.g. the face and most of all the mouth (None: uniform).
    branch: branch(args, kwargs) -> a hashable key naming the pass a call belongs to, when classifier-free
      guidance runs as separate calls (e.g. "positive" / "negative"); each branch keeps its own cache
      state. None: every call is one branch.
    guidance_pair: guidance_pair(args, kwargs) -> True when the call's batch is one classifier-free guidance
      step run as a pair, [B with the condition; the same B without], both halves with the same latents and
      timestep (what SyncCacheConfig.share_guidance needs). None: no call is.
    weight_prefix: human_weight may cover only the first N tokens of the sequence; the rest get the
      sample's smallest weight (Wan-S2V appends motion tokens whose number its arguments do not show).
      Without it a weight of the wrong length is an error.
    """
    heavy: Sequence[nn.Module]
    audio: Sequence[nn.Module]
    audio_after: Sequence[int]
    probe: int = 0
    human_weight: Optional[WeightFn] = None
    output_weight: Optional[WeightFn] = None
    branch: Optional[Callable[[tuple, dict], Hashable]] = None
    guidance_pair: Optional[Callable[[tuple, dict], bool]] = None
    weight_prefix: bool = False

    def __post_init__(self):
        self.heavy, self.audio, self.audio_after = list(self.heavy), list(self.audio), tuple(self.audio_after)
        self.validate()

    def validate(self):
        """Raise LayoutError on the first inconsistency."""
        if not self.heavy:
            raise LayoutError("layout has no heavy blocks")
        seen = {}
        for role, mods in (("heavy", self.heavy), ("audio", self.audio)):
            for i, m in enumerate(mods):
                if not isinstance(m, nn.Module):
                    raise LayoutError(f"{role} block {i} is a {type(m).__name__}, not an nn.Module")
                if id(m) in seen:
                    first = seen[id(m)]
                    if first[0] == role:
                        raise LayoutError(f"{role} block {i} is listed twice (also {role} block {first[1]})")
                    raise LayoutError(f"{role} block {i} is both heavy and audio "
                                      f"(also {first[0]} block {first[1]})")
                seen[id(m)] = (role, i)
        if len(self.audio_after) != len(self.audio):
            raise LayoutError(f"audio_after has {len(self.audio_after)} entries "
                              f"for {len(self.audio)} audio blocks")
        for i, a in enumerate(self.audio_after):
            if not _is_index(a, len(self.heavy)):
                raise LayoutError(f"audio block {i} is placed after heavy block {a!r}, "
                                  f"but heavy blocks are 0..{len(self.heavy) - 1}")
        self.audio_after = tuple(int(a) for a in self.audio_after)
        if not _is_index(self.probe, len(self.heavy)):
            raise LayoutError(f"probe {self.probe!r} is not a heavy block index 0..{len(self.heavy) - 1}")
        self.probe = int(self.probe)
        for name, gives in (("human_weight", "tensor or None"), ("output_weight", "tensor or None"),
                            ("branch", "hashable key"), ("guidance_pair", "bool")):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise LayoutError(f"{name} must be a function (args, kwargs) -> {gives}, "
                                  f"got a {type(fn).__name__}")

    def check_model(self, model: nn.Module):
        """Raise LayoutError if a listed block is not a submodule of model."""
        ids = {id(m) for m in model.modules()}
        for role, mods in (("heavy", self.heavy), ("audio", self.audio)):
            for i, m in enumerate(mods):
                if id(m) not in ids:
                    raise LayoutError(f"{role} block {i} ({type(m).__name__}) is not a submodule of the model")

    def spans(self) -> list:
        """Maximal runs [first, last] of heavy blocks between audio injection points."""
        cuts = sorted(set(self.audio_after))
        out, start = [], 0
        for c in cuts:
            out.append((start, c))
            start = c + 1
        if start < len(self.heavy):
            out.append((start, len(self.heavy) - 1))
        return out

    def cacheable_spans(self, probing: bool) -> list:
        """Per span, the (first, last) heavy blocks that may be bypassed, or None; probe blocks never are."""
        lo = self.probe + 1 if probing else 0
        return [(max(a, lo), b) if max(a, lo) <= b else None for a, b in self.spans()]

    def weight(self, args: tuple, kwargs: dict, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """The human weight [B, L] for this step, checked against the hidden state [B, L, D].

        With weight_prefix, a weight may cover only the first N < L tokens: the other L - N get the
        sample's smallest weight.
        """
        if self.human_weight is None:
            return None
        w = self.human_weight(args, kwargs)
        if w is None:
            return None
        if self.weight_prefix and isinstance(w, torch.Tensor) and w.dim() == 2 \
                and w.shape[0] == hidden.shape[0] and 0 < w.shape[1] < hidden.shape[1]:
            w = torch.cat([w, w.amin(1, keepdim=True).expand(-1, hidden.shape[1] - w.shape[1])], 1)
        self.check_weight(w, hidden)
        return w

    def out_weight(self, args: tuple, kwargs: dict, out: torch.Tensor) -> Optional[torch.Tensor]:
        """The output weight for this step, checked against the model's output; None: uniform."""
        if self.output_weight is None:
            return None
        w = self.output_weight(args, kwargs)
        if w is None:
            return None
        self.check_output_weight(w, out)
        return w

    @staticmethod
    def check_output_weight(w, out: torch.Tensor):
        """Raise LayoutError unless w is a finite, non-negative, not all-zero per-sample weight for out: as many
        dimensions, the batch size first, every other size 1 or out's."""
        if not isinstance(out, torch.Tensor):
            raise LayoutError(f"an output weight needs a tensor output, the model returned {type(out).__name__}")
        if not isinstance(w, torch.Tensor):
            raise LayoutError(f"output weight is a {type(w).__name__}, not a tensor")
        ok = w.dim() == out.dim() and w.shape[0] == out.shape[0] and all(
            a in (1, b) for a, b in zip(w.shape[1:], out.shape[1:]))
        if not ok:
            want = [out.shape[0]] + [f"1|{n}" for n in out.shape[1:]]
            raise LayoutError(f"output weight has shape {list(w.shape)}, expected one weight per sample "
                              f"broadcastable to the output {list(out.shape)}: [{', '.join(map(str, want))}]")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not bool((w > 0).any()):
            raise LayoutError("output weight must be finite, non-negative and not all zero")

    @staticmethod
    def check_weight(w, hidden: torch.Tensor):
        """Raise LayoutError unless w is a tensor of shape [B, L] for hidden [B, L, D]."""
        want = tuple(hidden.shape[:2])
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != want:
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise LayoutError(f"human weight has shape {got}, expected [B, L] = {list(want)} "
                              f"for hidden states of shape {list(hidden.shape)}")


def reference_layout(dit: nn.Module, context_weight: Optional[float] = None) -> BlockLayout:
    """Layout of engine's AvatarDiT, by duck typing: .blocks, .audio_blocks, .cfg.audio_after.

    Its output weight is cond.output_weight ([B, 1, 1, h, w]: face and mouth emphasised, see
    engine/model/dit.py AvatarDiT.output_weight), None (uniform) when the condition has none.

    The heavy blocks see [context tokens | chunk tokens], while cond.human_weight (the ChunkCondition,
    third positional argument of forward) covers only the N chunk tokens. The output is read from chunk
    tokens only, so context tokens (reference + motion, clean latents) count like the background: each
    gets the sample's smallest chunk weight, or `context_weight` when given.
    """
    for name in ("blocks", "audio_blocks", "cfg"):
        if not hasattr(dit, name):
            raise LayoutError(f"{type(dit).__name__} has no .{name}; not an AvatarDiT-like model")

    def human_weight(args, kwargs):
        cond = args[2] if len(args) > 2 else kwargs.get("cond")
        hw = getattr(cond, "human_weight", None)
        if hw is None:
            return None
        b, n_ctx = hw.shape[0], cond.context.shape[1]
        if context_weight is None:
            ctx = hw.amin(1, keepdim=True).expand(b, n_ctx)
        else:
            ctx = hw.new_full((b, n_ctx), float(context_weight))
        return torch.cat([ctx, hw], 1)

    def output_weight(args, kwargs):
        cond = args[2] if len(args) > 2 else kwargs.get("cond")
        return getattr(cond, "output_weight", None)

    def guidance_pair(args, kwargs):  # the condition was built with null_audio: [B with audio; B null]
        cond = args[2] if len(args) > 2 else kwargs.get("cond")
        return bool(getattr(cond, "guided", False))

    return BlockLayout(heavy=list(dit.blocks), audio=list(dit.audio_blocks),
                       audio_after=tuple(dit.cfg.audio_after), probe=0, human_weight=human_weight,
                       output_weight=output_weight, guidance_pair=guidance_pair)
