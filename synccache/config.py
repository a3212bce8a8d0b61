"""SyncCacheConfig: when to reuse heavy-block residuals and how much may be stored."""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from synccache.schedule import Schedule


@dataclass
class SyncCacheConfig:
    """Knobs of SyncCache; the defaults probe online with every cacheable span cached.

    enabled: False attaches nothing that changes a value: outputs are bit-identical to the plain model.
    threshold: reuse while the accumulated weighted probe error (see synccache.probe) stays below it.
    warmup: the first `warmup` steps of every sample are always computed fully (step 0 always is).
    max_reuse: most consecutive reuse steps before a full step is forced.
    spans: span indices (BlockLayout.spans()) that may be cached; None = every cacheable span.
    cache_ratio: fraction of the cacheable spans that may keep a residual, the deepest ones first.
    cache_bytes: cap on the bytes of stored residuals; spans that do not fit are always computed.
    schedule: a fixed offline plan (Schedule or path to its JSON); the hooks follow it with no probe,
      ignoring threshold / warmup / max_reuse; the budget above still applies.
    stream: streaming extension (beyond the paper): follow the schedule's `cross` steps, reusing residuals
      banked at the same step of the previous chunk (the caller resets with next_chunk=True between
      chunks of one session and starts every chunk from the same noise).
    stream_refresh: most consecutive chunks one banked residual may serve before it is recomputed.
    forecast: 0 = a reuse step adds the residual stored on the span's last computed step (the paper);
      1 = first-order forecast: that residual plus its per-step change between the span's last two
      computed steps, times the steps since (as TaylorSeer forecasts features; twice the memory).
      None = the schedule's own setting (its meta "forecast"), else 0.
    share_guidance: on calls the layout marks as a classifier-free guidance pair (BlockLayout.guidance_pair:
      one batch [B with audio; B without], same latents and timestep), every heavy block that runs runs on
      the first half only and both halves get its residual; the audio blocks run on both halves as ever.
      Before the first audio block the halves are equal, so that part is exact; after it the audio-free half
      borrows the heavy residuals of the half with audio, and guidance pushes along what the audio blocks
      add (beyond the paper; measured for lip sync in the README). Halves the heavy work of a guided step.
    """
    enabled: bool = True
    threshold: float = 0.15
    warmup: int = 2
    max_reuse: int = 3
    spans: Optional[Sequence[int]] = None
    cache_ratio: float = 1.0
    cache_bytes: Optional[int] = None
    schedule: Optional[Union[Schedule, str, Path]] = None
    stream: bool = False
    stream_refresh: int = 4
    forecast: Optional[int] = None
    share_guidance: bool = False

    def __post_init__(self):
        if isinstance(self.schedule, (str, Path)):
            self.schedule = Schedule.load(self.schedule)
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            raise ValueError(f"schedule must be a Schedule or a path, got {type(self.schedule).__name__}")
        if self.stream and (self.schedule is None or self.schedule.cross is None):
            raise ValueError("stream=True needs a schedule with 'cross' steps (syncavatar calibrate --stream)")
        if self.forecast is None:
            self.forecast = int(self.schedule.meta.get("forecast", 0)) if self.schedule is not None else 0
        if self.forecast not in (0, 1):
            raise ValueError(f"forecast must be 0 (plain reuse) or 1 (first order), got {self.forecast!r}")
        if self.stream_refresh < 1:
            raise ValueError(f"stream_refresh must be >= 1, got {self.stream_refresh}")
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")
        if self.warmup < 0 or self.max_reuse < 0:
            raise ValueError(f"warmup and max_reuse must be >= 0, got {self.warmup}, {self.max_reuse}")
        if not 0.0 <= self.cache_ratio <= 1.0:
            raise ValueError(f"cache_ratio must be in [0, 1], got {self.cache_ratio}")
        if self.cache_bytes is not None and self.cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {self.cache_bytes}")
        if self.spans is not None:
            self.spans = tuple(int(s) for s in self.spans)
