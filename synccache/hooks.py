"""Attach SyncCache to a model: modality-decoupled residual caching of heavy spans, removable exactly.

One model forward = one denoising step. Per step:
- probe mode: the heavy blocks up to the probe always run; the probe output is compared with the probe
  output of the last fully computed step (weighted relative L1, synccache.probe) and that distance is
  added to an accumulator that is cleared on every full step. The step reuses if the sum stays below the
  threshold, warmup is over, and fewer than max_reuse reuse steps precede it in a row.
- schedule mode: a fixed offline plan says which spans are bypassed at which step; no probe runs.
- streaming extension (config.stream, schedule mode): where the plan says `cross`, a span is bypassed with
  the residual it stored at the same step of the previous chunk (reset(next_chunk=True) carries them
  over); a carried residual is used for at most `stream_refresh` chunks in a row, then recomputed.
On a reuse step, each cached span's first block returns (input + the residual stored on its last
computed step) and its other blocks pass their input through without running. With config.forecast = 1
the residual is extrapolated to the current step from the span's last two computed steps (r0 at step t0,
r1 at t1 < t0, t1 >= 1): r0 + (t - t0) (r0 - r1) / (t0 - t1); without such a pair, r0 as it is. Audio
blocks are never touched: the model calls them as usual, on the current hidden state, at every step. On a
computed step every cached span stores output - input. Spans outside the budget always run.

How it attaches: each heavy block gets an instance-level `forward` wrapper (the class method stays as
it is), the model gets a forward pre-hook and an always-called forward hook that bracket the step, and
each audio block a pre-hook that only counts calls. `remove()` deletes all of that.

Classifier-free guidance run as one batch [with audio; without] (the reference DiT): with
config.share_guidance, on calls the layout marks as such a pair, every heavy block that runs runs on the
first half and adds its residual to both halves (the audio blocks still see both); see SyncCacheConfig.

Classifier-free guidance run as separate passes (diffsynth's Wan pipelines call the DiT once with the
audio and once without per step): each pass is a *branch* with a cache state of its own, so the two
trajectories never trade residuals and each follows the schedule step by step. The branch of a call is
`layout.branch(args, kwargs)` (None: one branch), or the name given with `handle.branch(name)`; cache_bytes
bounds the residuals of all branches together. A model that runs both halves in one batch (the reference
DiT) has one branch. Assumptions: heavy
blocks take the hidden state [B, L, D] as first argument (or `hidden_states=`/`x=`), return a tensor of
that shape and do not modify their input in place. Forward hooks a user registers on a heavy block
itself still fire on bypassed steps (the block is called, its own forward is not run).
"""
import contextlib
import math
from typing import Optional

import torch
import torch.nn as nn

from synccache.config import SyncCacheConfig
from synccache.layout import BlockLayout, LayoutError, hidden_state
from synccache.probe import weighted_rel_l1
from synccache.schedule import ScheduleError
from synccache.wrap import detach, wrap_forward

COMPUTE, REUSE, CROSS = "compute", "reuse", "cross"


class _State:
    """Everything that belongs to one sample (chunk); cleared by reset()."""

    def __init__(self, n_spans):
        self.step = -1
        self.args, self.kwargs, self.in_step = (), {}, False
        self.mode = [COMPUTE] * n_spans  # per span, this step
        self.inp = [None] * n_spans  # span input, held within a computed step
        self.res = [None] * n_spans  # stored residual (output - input) from the last computed step
        self.res_step = [None] * n_spans  # the step it was computed on
        self.slope = [None] * n_spans  # forecast: its change per step between the last two computed steps
        self.active = None  # spans allowed to keep residuals, resolved at the first heavy call
        self.anchor = None  # probe output of the last fully computed step
        self.acc, self.run = 0.0, 0
        self.bank, self.prev_bank = {}, {}  # stream: (span, step) -> (residual, age in chunks)

    def cache_bytes(self):
        held = [r for r in self.res + self.slope if r is not None] + [r for r, _ in self.bank.values()]
        held += [r for r, _ in self.prev_bank.values()]
        return sum(r.numel() * r.element_size() for r in {id(r): r for r in held}.values())


class _Stats:
    """Counters and traces reported by stats(); kept across reset(keep_stats=True)."""

    def __init__(self, n_spans):
        self.steps = self.reuse_steps = self.audio_calls = self.peak_bytes = self.shared_steps = 0
        self.computed, self.reused, self.crossed = [0] * n_spans, [0] * n_spans, [0] * n_spans
        self.probe_error, self.accumulated, self.decisions = [], [], []


class SyncCacheHandle:
    """SyncCache attached to one model: reset() per sample or chunk, stats(), remove(); branch() for CFG."""

    def __init__(self, model: nn.Module, config: SyncCacheConfig, layout: BlockLayout):
        self.model, self.config, self.layout = model, config, layout
        self.probing = config.schedule is None
        self.spans = layout.spans()
        self.cacheable = layout.cacheable_spans(self.probing)
        self._block_span = {}  # heavy index -> span index, for the blocks that can be bypassed
        for s, c in enumerate(self.cacheable):
            if c is not None:
                for i in range(c[0], c[1] + 1):
                    self._block_span[i] = s
        self._candidates = self._select_candidates()
        self._wrapped, self._hooks, self._removed = [], [], False
        self._states, self._key, self._forced = {}, None, []  # branch -> _State; current branch
        self._shared = False  # this step is a guidance pair whose heavy blocks run on the first half
        self._stats = _Stats(len(self.spans))

    @property
    def state(self) -> _State:
        """The cache state of the current branch (see the module docstring)."""
        st = self._states.get(self._key)
        if st is None:
            st = self._states[self._key] = _State(len(self.spans))
        return st

    def _held_bytes(self) -> int:
        """Bytes of residuals held by every branch together."""
        return sum(st.cache_bytes() for st in self._states.values())

    # --- budget ------------------------------------------------------------------------------------
    def _select_candidates(self):
        """Spans that may be cached before sizes are known: allowed, cacheable, ratio, deepest first."""
        cfg, n = self.config, len(self.spans)
        cand = [s for s, c in enumerate(self.cacheable) if c is not None]
        if cfg.spans is not None:
            bad = [s for s in cfg.spans if not 0 <= s < n]
            if bad:
                raise ValueError(f"config.spans {bad} out of range: the layout has spans 0..{n - 1}")
            cand = [s for s in cand if s in cfg.spans]
        if cfg.schedule is not None:
            cand = [s for s in cand if s in cfg.schedule.cached_spans]
        k = math.floor(cfg.cache_ratio * len([c for c in self.cacheable if c is not None]) + 1e-9)
        return cand[max(0, len(cand) - k):] if k > 0 else []

    def _resolve_active(self, x):
        """Apply the byte budget once the residual size (that of the hidden state) is known."""
        cand = list(self._candidates)
        if self.config.cache_bytes is not None:
            fit = self.config.cache_bytes // max(1, x.numel() * x.element_size())
            cand = cand[max(0, len(cand) - fit):] if fit > 0 else []
        self.state.active = cand

    def _store(self, s, res):
        """Keep span s's residual (and its forecast slope) unless that would exceed cache_bytes (then s is
        always computed)."""
        st = self.state
        prev, prev_step = st.res[s], st.res_step[s]
        st.res[s], st.slope[s], st.res_step[s] = None, None, None
        limit = self.config.cache_bytes
        need = res.numel() * res.element_size() * (2 if self.config.forecast else 1)
        if limit is not None and self._held_bytes() + need > limit:
            st.active = [a for a in st.active if a != s]
            return
        st.res[s], st.res_step[s] = res, st.step
        # step 0 sees pure noise: its residual is off the smooth part of the trajectory, no slope from it
        if self.config.forecast and prev is not None and prev.shape == res.shape and 0 < prev_step < st.step:
            st.slope[s] = (res - prev) / (st.step - prev_step)
        self._stats.peak_bytes = max(self._stats.peak_bytes, self._held_bytes())

    # --- per step ----------------------------------------------------------------------------------
    def _begin(self, module, args, kwargs):
        """Model forward pre-hook: a new step (of the branch this call belongs to)."""
        if self._forced:
            self._key = self._forced[-1]
        else:
            self._key = self.layout.branch(args, kwargs) if self.layout.branch is not None else None
        st, cfg = self.state, self.config
        st.step += 1
        st.args, st.kwargs, st.in_step = args, kwargs, True
        self._shared = bool(cfg.enabled and cfg.share_guidance and self.layout.guidance_pair(args, kwargs))
        st.mode = [COMPUTE] * len(self.spans)
        if cfg.enabled and cfg.schedule is not None:
            st.mode = [REUSE if cfg.schedule.reuses(s, st.step) else COMPUTE for s in range(len(self.spans))]
            if cfg.stream:
                for s in range(len(self.spans)):
                    carried = st.prev_bank.get((s, st.step))
                    if cfg.schedule.crosses(s, st.step) and carried is not None \
                            and carried[1] < cfg.stream_refresh:
                        st.mode[s] = CROSS

    def _end(self, module, args, output):
        """Model forward hook (always called): count the step, drop references to its inputs."""
        st, stats = self.state, self._stats
        st.args, st.kwargs, st.in_step = (), {}, False
        st.inp = [None] * len(self.spans)
        stats.steps += 1
        stats.shared_steps += self._shared
        self._shared = False
        for s, m in enumerate(st.mode):
            if m == REUSE:
                stats.reused[s] += 1
            elif m == CROSS:
                stats.crossed[s] += 1
            else:
                stats.computed[s] += 1
        bypassed = REUSE in st.mode or CROSS in st.mode
        stats.reuse_steps += bypassed
        stats.decisions.append("R" if bypassed else "C")

    def _decide(self, probe_out):
        """After the probe block: compute or reuse this step (probe mode only)."""
        st, cfg = self.state, self.config
        w = self.layout.weight(st.args, st.kwargs, probe_out)
        err, reuse = None, False
        if st.anchor is not None and st.anchor.shape == probe_out.shape:
            err = weighted_rel_l1(probe_out, st.anchor, w)
            ready = bool(st.active) and all(st.res[s] is not None for s in st.active)
            reuse = (st.step >= max(cfg.warmup, 1) and st.acc + err < cfg.threshold
                     and st.run < cfg.max_reuse and ready)
        self._stats.probe_error.append(err)
        if reuse:
            st.acc, st.run = st.acc + err, st.run + 1
            for s in st.active:
                st.mode[s] = REUSE
        else:
            st.acc, st.run, st.anchor = 0.0, 0, probe_out.detach()
        self._stats.accumulated.append(st.acc)

    def _heavy(self, i, forward, args, kwargs):
        """Wrapped forward of heavy block i."""
        st, cfg = self.state, self.config
        if not (st.in_step and cfg.enabled):
            return forward(*args, **kwargs)
        x = hidden_state(i, args, kwargs)
        if st.active is None:
            self._resolve_active(x)
        s = self._block_span.get(i)
        if s is None:  # probe or uncacheable block: always runs
            out = self._run(forward, x, args, kwargs)
            if self.probing and i == self.layout.probe:
                self._decide(out)
            return out
        first, last = self.cacheable[s]
        cached = s in st.active
        if st.mode[s] == CROSS:
            if not cached:
                st.mode[s] = COMPUTE
            elif i == first:
                r, age = st.prev_bank[(s, st.step)]
                if r.shape == x.shape:
                    st.res[s], st.res_step[s], st.slope[s] = r, st.step, None  # later reuses continue from it
                    st.bank[(s, st.step)] = (r, age + 1)
                    return x + r
                st.mode[s] = COMPUTE
            else:
                return x
        if i == first and st.mode[s] == REUSE:
            r = st.res[s]
            if cached and r is not None and r.shape == x.shape:
                if st.slope[s] is not None:
                    return torch.add(x + r, st.slope[s], alpha=st.step - st.res_step[s])
                return x + r
            st.mode[s] = COMPUTE  # nothing valid to reuse: compute this span
        if st.mode[s] == REUSE:
            return x  # inner block of a bypassed span
        if i == first and cached:
            st.inp[s] = x
        out = self._run(forward, x, args, kwargs)
        if i == last and cached and st.inp[s] is not None:
            if not isinstance(out, torch.Tensor) or out.shape != st.inp[s].shape:
                raise LayoutError(f"heavy block {i} must return a tensor shaped like its input")
            self._store(s, (out - st.inp[s]).detach())
            if self.config.stream and self.config.schedule.crosses(s, st.step) and st.res[s] is not None:
                st.bank[(s, st.step)] = (st.res[s], 0)
            st.inp[s] = None
        return out

    def _run(self, forward, x, args, kwargs):
        """Run a heavy block; on a shared guidance pair on the first half of the batch, its residual added to
        both halves (every argument batched like x is halved)."""
        if not self._shared:
            return forward(*args, **kwargs)
        b = x.shape[0]
        if b % 2:
            raise LayoutError(f"a guidance pair needs an even batch, heavy block got {b}")
        half = lambda v: v[:b // 2] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b else v
        out = forward(*[half(a) for a in args], **{k: half(v) for k, v in kwargs.items()})
        if not isinstance(out, torch.Tensor) or out.shape != x[:b // 2].shape:
            raise LayoutError("a heavy block must return a tensor shaped like its input")
        r = out - x[:b // 2]
        return x + torch.cat([r, r])

    def _count_audio(self, module, args):
        self._stats.audio_calls += 1

    # --- attach / detach ---------------------------------------------------------------------------
    def _attach(self):
        for i, block in enumerate(self.layout.heavy):
            self._wrapped.append(wrap_forward(block, lambda f, *a, _i=i, **k: self._heavy(_i, f, a, k)))
        self._hooks.append(self.model.register_forward_pre_hook(self._begin, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self._end, always_call=True))
        for blk in self.layout.audio:
            self._hooks.append(blk.register_forward_pre_hook(self._count_audio))

    def reset(self, keep_stats: bool = False, next_chunk: bool = False) -> None:
        """Forget residuals and probe state of every branch (new sample or chunk); stats too unless keep_stats.

        next_chunk (streaming extension): the next sample is the next chunk of the same session, so the
        residuals each branch banked for `cross` steps are kept for it.
        """
        fresh = {}
        for key, old in self._states.items():
            bank = old.bank if next_chunk and self.config.stream else {}
            if bank:
                fresh[key] = st = _State(len(self.spans))
                st.prev_bank, st.active = bank, old.active
        self._states = fresh
        if not keep_stats:
            self._stats = _Stats(len(self.spans))

    @contextlib.contextmanager
    def branch(self, name):
        """Calls inside this block belong to branch `name` (e.g. "negative" for the unconditional CFG pass),
        whatever layout.branch says: each branch keeps its own residuals and step count."""
        self._forced.append(name)
        try:
            yield self
        finally:
            self._forced.pop()

    def remove(self) -> None:
        """Detach everything: the model's modules are as they were before apply_synccache."""
        if self._removed:
            return
        detach(self._wrapped, self._hooks)
        self._wrapped, self._hooks, self._removed = [], [], True
        self._states = {}

    def stats(self) -> dict:
        """Per-span computed/reused counts, probe error trace, residual bytes, audio block calls."""
        st, ss = self._states.get(self._key), self._stats
        active = st.active if st is not None and st.active is not None else self._candidates
        return {
            "mode": "off" if not self.config.enabled else ("probe" if self.probing else
                                                            "schedule+stream" if self.config.stream else "schedule"),
            "steps": ss.steps, "reuse_steps": ss.reuse_steps, "computed_steps": ss.steps - ss.reuse_steps,
            "decisions": "".join(ss.decisions),
            "spans": [{"blocks": list(b), "cacheable": list(c) if c else None, "cached": s in active,
                       "computed": ss.computed[s], "reused": ss.reused[s], "crossed": ss.crossed[s]}
                      for s, (b, c) in enumerate(zip(self.spans, self.cacheable))],
            "cached_spans": list(active),
            "probe_error": list(ss.probe_error), "accumulated_error": list(ss.accumulated),
            "cache_bytes": self._held_bytes(), "peak_cache_bytes": ss.peak_bytes,
            "audio_calls": ss.audio_calls, "branches": [str(k) for k in self._states],
            "shared_steps": ss.shared_steps,
        }

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def apply_synccache(model: nn.Module, config: Optional[SyncCacheConfig], layout: BlockLayout) -> SyncCacheHandle:
    """Attach SyncCache to model (the module whose forward is one denoising step) -> handle."""
    config = config if config is not None else SyncCacheConfig()
    layout.validate()
    layout.check_model(model)
    for i, block in enumerate(layout.heavy):
        f = block.__dict__.get("forward")
        if getattr(f, "_synccache", False) or getattr(f, "_baseline", False):
            raise RuntimeError(f"a cache is already applied (heavy block {i}); remove() it first")
    sched = config.schedule
    if sched is not None:
        spans = [list(p) for p in layout.spans()]
        if sched.num_spans != len(spans):
            raise ScheduleError(f"schedule has {sched.num_spans} spans, the layout has {len(spans)}")
        if sched.spans is not None and [list(p) for p in sched.spans] != spans:
            raise ScheduleError(f"schedule was made for spans {sched.spans}, the layout has {spans}")
    if config.share_guidance and layout.guidance_pair is None:
        raise LayoutError("share_guidance needs a layout that marks guidance pairs (BlockLayout.guidance_pair)")
    handle = SyncCacheHandle(model, config, layout)
    handle._attach()
    return handle
