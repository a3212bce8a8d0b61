"""Offline schedule: which spans keep residuals and on which steps they are reused, chosen by DP.

Formulation. Calibration gives err[s][t] >= 0, the error of reusing span s at step t (the output change
when span s is bypassed with its stored residual at step t; inf = never reuse there). An entry may also
be a list over the residual's age, err[s][t][a-1] for a residual computed a steps earlier (a = 1, 2, ...;
past the list's end: inf): a stale residual errs more, and a table by age lets the plan weigh a long run
of reuses by what it really costs instead of by its one-step errors. Errors are taken as additive across
span-steps. A plan caches at most `max_spans` spans (the memory budget: each cached span stores one
residual) and marks reuse steps per cached span, never before `warmup` (and never at step 0, which has
no residual yet), with at most `max_run` consecutive reuses per span. Its cost saved is the number of
reused span-steps K, its error the sum of err over them (at their ages).

E(K) = the least error over plans reusing exactly K span-steps; it is non-decreasing in K (dropping a
reuse keeps a plan valid with one-step errors; with errors by age, dropping the last reuse of a run
does). `plan` computes the whole curve E(K) by dynamic programming, then answers either question with it:
  error_bound=b  -> the largest K with E(K) <= b (maximise reuses under an error bound), or
  reuses=K       -> the least-error plan with K reuses.
DP: per span, over steps with state (reuses so far, current run length) -> min error for each k; the
run length is the residual's age minus one; then a grouped knapsack over spans with state (spans cached,
total reuses). `brute_force` enumerates every plan (small cases only) and is what the tests check the DP
against.
"""
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

SCHEDULE_VERSION = 1
_TOL = 1e-9


class ScheduleError(ValueError):
    """A schedule (file) that cannot be used, or a planning request that cannot be met."""


@dataclass
class Schedule:
    """reuse[s][t]: bypass span s at step t; a span is cached iff it is reused at some step.

    cross[s][t] (streaming extension, optional): on a step the plan computes, bypass span s with the
    residual span s stored at the same step t of the previous chunk instead (needs SyncCacheConfig(stream=
    True) and the same start noise in every chunk; the first chunk of a session computes these steps).
    """
    reuse: list
    spans: Optional[list] = None  # the layout's span block ranges [[first, last], ...], checked on apply
    error: Optional[float] = None  # predicted total error of the plan
    meta: dict = field(default_factory=dict)
    cross: Optional[list] = None

    def __post_init__(self):
        self.reuse = [[bool(v) for v in row] for row in self.reuse]
        _check_reuse(self.reuse, len(self.reuse[0]) if self.reuse else 0)
        if self.cross is not None:
            self.cross = [[bool(v) for v in row] for row in self.cross]
            if len(self.cross) != len(self.reuse) or any(len(r) != self.steps for r in self.cross):
                raise ScheduleError(f"'cross' must be {len(self.reuse)} rows of {self.steps} steps like 'reuse'")
            for s, (rr, cr) in enumerate(zip(self.reuse, self.cross)):
                if any(a and b for a, b in zip(rr, cr)):
                    raise ScheduleError(f"span {s} is marked both reuse and cross at the same step")

    def crosses(self, span: int, step: int) -> bool:
        """True if the plan takes span's residual from the previous chunk at this step."""
        return self.cross is not None and 0 <= step < self.steps and self.cross[span][step]

    @property
    def steps(self) -> int:
        return len(self.reuse[0]) if self.reuse else 0

    @property
    def num_spans(self) -> int:
        return len(self.reuse)

    @property
    def cached_spans(self) -> list:
        cross = self.cross or [[]] * self.num_spans
        return [s for s, row in enumerate(self.reuse) if any(row) or any(cross[s])]

    @property
    def reuse_count(self) -> int:
        return sum(map(sum, self.reuse))

    @property
    def cross_count(self) -> int:
        return sum(map(sum, self.cross)) if self.cross is not None else 0

    def reuses(self, span: int, step: int) -> bool:
        """True if the plan bypasses span at step (False beyond the planned steps)."""
        return 0 <= step < self.steps and self.reuse[span][step]

    def to_dict(self) -> dict:
        d = {"version": SCHEDULE_VERSION, "steps": self.steps, "num_spans": self.num_spans,
             "spans": self.spans, "reuse": [[int(v) for v in row] for row in self.reuse],
             "error": self.error, "meta": self.meta}
        if self.cross is not None:
            d["cross"] = [[int(v) for v in row] for row in self.cross]
        return d

    @classmethod
    def from_dict(cls, d) -> "Schedule":
        """Parse and validate; raise ScheduleError with one clear line on anything wrong."""
        if not isinstance(d, dict):
            raise ScheduleError(f"schedule must be a JSON object, got {type(d).__name__}")
        for key in ("version", "steps", "reuse"):
            if key not in d:
                raise ScheduleError(f"schedule has no '{key}' key")
        if d["version"] != SCHEDULE_VERSION:
            raise ScheduleError(f"unknown schedule version {d['version']!r} (this code reads {SCHEDULE_VERSION})")
        steps, reuse = d["steps"], d["reuse"]
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ScheduleError(f"'steps' must be a positive integer, got {steps!r}")
        if not isinstance(reuse, list) or not reuse or not all(isinstance(r, list) for r in reuse):
            raise ScheduleError("'reuse' must be a non-empty list of per-span lists")
        if "num_spans" in d and d["num_spans"] != len(reuse):
            raise ScheduleError(f"'reuse' has {len(reuse)} spans, 'num_spans' says {d['num_spans']}")
        for s, row in enumerate(reuse):
            if any(v not in (0, 1) for v in row):  # True/False compare equal to 1/0
                raise ScheduleError(f"reuse row {s} must hold only 0/1")
        _check_reuse(reuse, steps)
        spans = d.get("spans")
        if spans is not None:
            ok = isinstance(spans, list) and len(spans) == len(reuse) and all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(i, int) for i in p) for p in spans)
            if not ok:
                raise ScheduleError(f"'spans' must list {len(reuse)} [first, last] block pairs, got {spans!r}")
        error = d.get("error")
        if error is not None and not isinstance(error, (int, float)):
            raise ScheduleError(f"'error' must be a number or null, got {error!r}")
        meta = d.get("meta") or {}
        if not isinstance(meta, dict):
            raise ScheduleError("'meta' must be an object")
        cross = d.get("cross")
        if cross is not None and (not isinstance(cross, list) or not all(
                isinstance(r, list) and all(v in (0, 1) for v in r) for r in cross)):
            raise ScheduleError("'cross' must be per-span lists of 0/1")
        return cls(reuse=reuse, spans=spans, error=error, meta=meta, cross=cross)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path) -> "Schedule":
        """Read a schedule JSON file; ScheduleError (naming the file) if it is malformed."""
        text = Path(path).read_text()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ScheduleError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except ScheduleError as e:
            raise ScheduleError(f"{path}: {e}") from None


def _check_reuse(reuse, steps):
    """Raise ScheduleError on ragged rows or a reuse at step 0."""
    if not reuse:
        raise ScheduleError("schedule has no spans")
    for s, row in enumerate(reuse):
        if len(row) != steps:
            raise ScheduleError(f"reuse row {s} has {len(row)} steps, expected {steps}")
        if row[0]:
            raise ScheduleError(f"reuse row {s} reuses at step 0, which has no stored residual")


def max_spans_for_bytes(cache_bytes: int, span_bytes: int) -> int:
    """How many span residuals of span_bytes each fit in cache_bytes."""
    return int(cache_bytes // span_bytes) if span_bytes > 0 else 0


# --- dynamic programming ---------------------------------------------------------------------------
def _cost(entry, age):
    """Error of a reuse whose residual is `age` steps old: a number (any age) or a list by age."""
    if isinstance(entry, tuple):
        return entry[age - 1] if age <= len(entry) else math.inf
    return entry


def _check_err(err):
    """Validate the error table -> rows of floats or (by age) tuples of floats."""
    def entry(v, s):
        by_age = isinstance(v, (list, tuple))
        vals = tuple(float(x) for x in v) if by_age else (float(v),)
        if not vals:
            raise ScheduleError(f"error row {s} has an empty list of errors by age")
        if any(math.isnan(x) or x < 0 for x in vals):
            raise ScheduleError(f"error row {s} has negative or NaN entries")
        return vals if by_age else vals[0]

    rows = [[entry(v, s) for v in row] for s, row in enumerate(err)]
    if not rows or not rows[0]:
        raise ScheduleError("error table is empty")
    steps = len(rows[0])
    for s, row in enumerate(rows):
        if len(row) != steps:
            raise ScheduleError(f"error row {s} has {len(row)} steps, expected {steps}")
    return rows


def one_step_errors(err) -> list:
    """[spans][steps] errors of reusing a residual from the step before (the age-1 slice of a table)."""
    return [[_cost(v, 1) for v in row] for row in _check_err(err)]


def _span_curve(row, warmup, max_run):
    """Per span: {k: (min error, reuse steps)} over plans reusing exactly k steps."""
    steps = len(row)
    run_cap = steps if max_run is None else max_run
    layer = {(0, 0): 0.0}  # (reuses, current run) -> min error
    back = []  # per step: state -> (previous state, reused at this step)
    for t in range(steps):
        nxt, par = {}, {}
        for (k, r), e in layer.items():
            moves = [((k, 0), e, False)]
            cost = _cost(row[t], r + 1)
            if t >= max(warmup, 1) and r < run_cap and math.isfinite(cost):
                moves.append(((k + 1, r + 1), e + cost, True))
            for key, val, reused in moves:
                if key not in nxt or val < nxt[key]:
                    nxt[key], par[key] = val, ((k, r), reused)
        back.append(par)
        layer = nxt
    best = {}
    for key, e in layer.items():
        if key[0] not in best or e < best[key[0]][0]:
            best[key[0]] = (e, key)
    curve = {}
    for k, (e, key) in best.items():
        chosen = []
        for t in range(steps - 1, -1, -1):
            key, reused = back[t][key]
            if reused:
                chosen.append(t)
        curve[k] = (e, sorted(chosen))
    return curve


def error_curve(err: Sequence[Sequence[float]], max_spans: int, warmup: int = 1,
                max_run: Optional[int] = None) -> dict:
    """DP: {K: (min error, per-span reuse steps)} for every achievable number K of reused span-steps."""
    rows = _check_err(err)
    curves = [_span_curve(row, warmup, max_run) for row in rows]
    table = {(0, 0): (0.0, ())}  # (spans cached, reuses) -> (min error, per-span choices so far)
    for curve in curves:
        nxt = {}
        for (j, total), (e, picks) in table.items():
            options = [(0, 0.0, [])] + [(k, ek, st) for k, (ek, st) in curve.items() if k > 0 and j < max_spans]
            for k, ek, st in options:
                key = (j + (k > 0), total + k)
                val = e + ek
                if key not in nxt or val < nxt[key][0]:
                    nxt[key] = (val, picks + (st,))
        table = nxt
    out = {}
    for (_, total), (e, picks) in table.items():
        if total not in out or e < out[total][0]:
            out[total] = (e, list(picks))
    return dict(sorted(out.items()))


def _pick(curve, steps, error_bound, reuses, meta):
    """Choose K from the curve E(K) and build the Schedule."""
    if (error_bound is None) == (reuses is None):
        raise ScheduleError("give exactly one of error_bound= or reuses=")
    if error_bound is not None and not error_bound >= 0:
        raise ScheduleError(f"error_bound must be >= 0, got {error_bound!r}")
    if reuses is not None:
        if reuses not in curve:
            raise ScheduleError(f"cannot reuse {reuses} span-steps under this budget (at most {max(curve)})")
        k = reuses
    else:
        k = max(k for k, (e, _) in curve.items() if e <= error_bound + _TOL * (1 + abs(error_bound)))
    e, picks = curve[k]
    reuse = [[t in set(st) for t in range(steps)] for st in picks]
    return Schedule(reuse=reuse, error=e, meta=meta)


def plan(err: Sequence[Sequence[float]], max_spans: int, *, error_bound: Optional[float] = None,
         reuses: Optional[int] = None, warmup: int = 1, max_run: Optional[int] = None,
         spans: Optional[list] = None) -> Schedule:
    """Best schedule by DP: most reuses with error <= error_bound, or least error with `reuses` reuses."""
    rows = _check_err(err)
    meta = {"solver": "dp", "max_spans": max_spans, "warmup": warmup, "max_run": max_run,
            "error_bound": error_bound, "reuses": reuses}
    sched = _pick(error_curve(rows, max_spans, warmup, max_run), len(rows[0]), error_bound, reuses, meta)
    sched.spans = [list(p) for p in spans] if spans is not None else None
    return sched


def brute_force(err: Sequence[Sequence[float]], max_spans: int, *, error_bound: Optional[float] = None,
                reuses: Optional[int] = None, warmup: int = 1, max_run: Optional[int] = None) -> Schedule:
    """Same answer as `plan` by enumerating every plan; exponential, for tests on tiny tables only."""
    rows = _check_err(err)
    steps = len(rows[0])
    free = [t for t in range(max(warmup, 1), steps)]
    run_cap = steps if max_run is None else max_run

    def cost(chosen, row):
        """Summed error of reusing at `chosen` (each at its age), or None if the plan is invalid."""
        run = longest = 0
        total = 0.0
        for t in range(steps):
            run = run + 1 if t in chosen else 0
            longest = max(longest, run)
            if run:
                total += _cost(row[t], run)
        return total if longest <= run_cap and math.isfinite(total) else None

    per_span = []
    for row in rows:
        opts = []
        for n in range(len(free) + 1):
            for chosen in itertools.combinations(free, n):
                e = cost(set(chosen), row)
                if e is not None:
                    opts.append((n, e, list(chosen)))
        per_span.append(opts)
    curve = {}
    for combo in itertools.product(*per_span):
        if sum(1 for n, _, _ in combo if n > 0) > max_spans:
            continue
        k, e = sum(c[0] for c in combo), sum(c[1] for c in combo)
        if k not in curve or e < curve[k][0]:
            curve[k] = (e, [c[2] for c in combo])
    meta = {"solver": "brute_force", "max_spans": max_spans, "warmup": warmup, "max_run": max_run}
    return _pick(curve, steps, error_bound, reuses, meta)
