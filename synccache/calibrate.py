"""Calibration for the offline schedule: the error of reusing each span at each step.

`SpanErrorRecorder` wraps the model's forward (one call = one denoising step). On every call it first
runs the step once per span with that span bypassed by the residual it stored on the previous step, then
runs the plain step, which it returns (so the sampling trajectory is exactly the uncached one) and from
which it stores fresh residuals. The error of reusing span s at step t is the relative L1 distance of the
bypassed step's output from the plain output; `errors()` averages it over every sample recorded.
A step costs 1 + (number of spans) forwards while recording.

The distance is weighted by the layout's output weight when it has one (BlockLayout.output_weight; for
the reference DiT the face x4 and the mouth x16, see reference_layout): sum(w |cur - ref|) / sum(w |ref|)
over the batch, so a reuse is priced by where its error lands, and the DP spends reuse where the mouth does
not pay for it. weighted=False, or a layout without one, gives the plain relative L1 (every output element
alike).

With max_age=A > 1 it also bypasses each span with the residual of 2, ..., A steps before:
`errors_by_age()` is [span][step][age - 1], the table by age that lets the DP price a run of reuses by
what it costs (a residual gets stale). With forecast=1 the residual of step t-a is extrapolated as the
hooks do (SyncCacheConfig.forecast), with the slope from step t-2a (a plan computing every a steps; no
slope from step 0). A step then costs up to 1 + spans * A forwards.

With cross=True (the streaming extension) it also measures, from the second chunk of a session on
(`reset(next_chunk=True)` between chunks), the error of bypassing span s at step t with the residual it
had at step t of the previous chunk: `cross_errors()`. That costs another (number of spans) forwards.

Guidance run as separate calls (layout.branch, see synccache.hooks): each branch is recorded on its own
(its own step count and residuals), and its errors count as another sample of the same (span, step).

    with SpanErrorRecorder(model, layout) as rec:
        for chunk in calibration_chunks:
            rec.reset()              # a new sample: no residuals yet
            run_the_sampler(chunk)   # the model is called once per step
    err = rec.errors()               # [spans][steps] -> synccache.schedule.plan(err, ...)
"""
import math

import torch
import torch.nn as nn

from synccache.layout import BlockLayout, LayoutError, hidden_state
from synccache.probe import output_rel_l1
from synccache.wrap import unwrap, wrap_forward


class _Track:
    """What the recorder holds for one branch (CFG pass) of the current sample."""

    def __init__(self, prev_bank=None):
        self.step = -1
        self.res, self.inp = {}, {}  # span -> residual of the last plain step; span -> its input, in a step
        self.hist = {}  # step -> {span: residual}, for ages > 1 and the forecast
        self.bank, self.prev_bank = {}, prev_bank or {}  # step -> {span: residual}: this / previous chunk


class SpanErrorRecorder:
    """Measures err[s][t] on the uncached trajectory; removable like the cache hooks."""

    def __init__(self, model: nn.Module, layout: BlockLayout, cross: bool = False, max_age: int = 1,
                 forecast: int = 0, weighted: bool = True):
        """weighted: weigh errors by layout.output_weight (if the layout has one); False: uniform."""
        layout.validate()
        if max_age < 1 or forecast not in (0, 1):
            raise ValueError(f"max_age must be >= 1 and forecast 0 or 1, got {max_age}, {forecast}")
        self.cross, self.max_age, self.forecast = cross, int(max_age), int(forecast)
        self.weighted = bool(weighted)
        self.weighted_steps, self.uniform_steps = 0, 0  # measured steps with / without an output weight
        self._xsum, self._xcount = {}, {}
        self._tracks, self._key = {}, None  # branch -> _Track; the branch of the current call
        layout.check_model(model)
        self.model, self.layout = model, layout
        self.spans = layout.spans()
        self._span_of = {i: s for s, (a, b) in enumerate(self.spans) for i in range(a, b + 1)}
        self._sum, self._count = {}, {}  # (s, t) -> summed error, samples (age 1)
        self._asum, self._acount = {}, {}  # (s, t, age) -> summed error, samples
        self._bypass = None  # span bypassed in the current forward, or None (plain, recording)
        self._bypass_res = None
        self._wrapped = []
        self._attach()

    @property
    def _track(self) -> _Track:
        tr = self._tracks.get(self._key)
        if tr is None:
            tr = self._tracks[self._key] = _Track()
        return tr

    def _heavy(self, i, forward, args, kwargs):
        s = self._span_of[i]
        first, last = self.spans[s]
        x = hidden_state(i, args, kwargs)
        if self._bypass == s:
            return x + self._bypass_res if i == first else x
        tr = self._track
        if self._bypass is None and i == first:
            tr.inp[s] = x
        out = forward(*args, **kwargs)
        if self._bypass is None and i == last:
            if not isinstance(out, torch.Tensor) or out.shape != tr.inp[s].shape:
                raise LayoutError(f"heavy block {i} must return a tensor shaped like its input")
            tr.res[s] = (out - tr.inp[s]).detach()
        return out

    def _forward(self, plain_forward, *args, **kwargs):
        self._key = self.layout.branch(args, kwargs) if self.layout.branch is not None else None
        tr = self._track
        tr.step += 1
        t = tr.step
        by_age = {}  # (span, age) -> output with the span bypassed by its (forecast) residual of step t-age
        for a in range(1, min(t, self.max_age) + 1):
            if len(tr.hist.get(t - a, {})) == len(self.spans):
                res = {s: self._residual(s, t, a) for s in range(len(self.spans))}
                by_age |= {(s, a): o for s, o in self._bypassed(plain_forward, args, kwargs, res).items()}
        xouts = {}
        prev = tr.prev_bank.get(t, {})
        if self.cross and len(prev) == len(self.spans):
            xouts = self._bypassed(plain_forward, args, kwargs, prev)
        out = plain_forward(*args, **kwargs)
        w = self.layout.out_weight(args, kwargs, out) if self.weighted and (by_age or xouts) else None
        if by_age or xouts:
            self.weighted_steps += w is not None
            self.uniform_steps += w is None
        for (s, a), o in by_age.items():
            e = output_rel_l1(o, out, w)
            self._asum[(s, t, a)] = self._asum.get((s, t, a), 0.0) + e
            self._acount[(s, t, a)] = self._acount.get((s, t, a), 0) + 1
            if a == 1:
                self._sum[(s, t)] = self._sum.get((s, t), 0.0) + e
                self._count[(s, t)] = self._count.get((s, t), 0) + 1
        for s, o in xouts.items():
            self._xsum[(s, t)] = self._xsum.get((s, t), 0.0) + output_rel_l1(o, out, w)
            self._xcount[(s, t)] = self._xcount.get((s, t), 0) + 1
        tr.hist[t] = dict(tr.res)
        tr.hist.pop(t - 2 * self.max_age, None)
        if self.cross:
            tr.bank[t] = dict(tr.res)
        return out

    def _residual(self, s, t, a):
        """Span s's residual from step t-a, forecast to step t when configured (slope from step t-2a)."""
        hist = self._track.hist
        r = hist[t - a][s]
        old = hist.get(t - 2 * a, {}).get(s)
        if self.forecast and old is not None and t - 2 * a >= 1:
            return r + (r - old)  # slope (r - old) / a, extrapolated a steps
        return r

    def _bypassed(self, plain_forward, args, kwargs, residuals):
        """Outputs of the step with each span bypassed in turn by residuals[span]."""
        outs = {}
        for s in range(len(self.spans)):
            self._bypass, self._bypass_res = s, residuals[s]
            try:
                outs[s] = plain_forward(*args, **kwargs)
            finally:
                self._bypass, self._bypass_res = None, None
        return outs

    def _attach(self):
        for i, block in enumerate(self.layout.heavy):
            self._wrapped.append(wrap_forward(block, lambda f, *a, _i=i, **k: self._heavy(_i, f, a, k),
                                              marker="_recorder"))
        self._wrapped.append(wrap_forward(self.model, self._forward, marker="_recorder"))

    def reset(self, next_chunk: bool = False):
        """A new sample: step numbering restarts and no residual is carried over, except with next_chunk
        (the next chunk of the same session), which keeps this chunk's per-step residuals for cross errors."""
        self._tracks = {k: _Track(tr.bank if next_chunk else None) for k, tr in self._tracks.items()}

    def errors(self) -> list:
        """[spans][steps] mean error of reusing span s at step t (inf where never measured: step 0)."""
        return self._table(self._sum, self._count)

    def errors_by_age(self) -> list:
        """[spans][steps][ages] mean error of reusing span s at step t with the residual of step t - age
        (inf where never measured)."""
        steps = 1 + max((t for _, t in self._count), default=0)
        return [[[self._asum[(s, t, a)] / self._acount[(s, t, a)] if (s, t, a) in self._acount else math.inf
                  for a in range(1, self.max_age + 1)] for t in range(steps)] for s in range(len(self.spans))]

    def cross_errors(self) -> list:
        """[spans][steps] mean error of taking span s's residual from step t of the previous chunk."""
        return self._table(self._xsum, self._xcount)

    def _table(self, total, count):
        steps = 1 + max((t for _, t in list(self._count) + list(self._xcount)), default=0)
        return [[total[(s, t)] / count[(s, t)] if (s, t) in count else math.inf
                 for t in range(steps)] for s in range(len(self.spans))]

    def samples(self) -> int:
        return max(self._count.values(), default=0)

    def remove(self):
        unwrap(self._wrapped)
        self._wrapped = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
