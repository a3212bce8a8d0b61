"""Cache methods by name, for render, bench and the live engine: build the config, attach it to the DiT.

`none` runs the plain model; `synccache` follows the offline DP schedule of configs/synccache/ (or probes
online when a threshold is given); `synccache-stream` adds the streaming extension (residuals reused
across the chunks of a session, every chunk from the same noise; beyond the paper); the peers (`fora`, `teacache`, `fbcache`, `magcache`, `deepcache`)
come from synccache.baselines and skip the audio blocks on their reuse steps, as their sources do.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SCHEDULE = ROOT / "configs" / "synccache" / "ref-XS.json"
DEFAULT_STREAM_SCHEDULE = ROOT / "configs" / "synccache" / "ref-XS-stream.json"
DEFAULT_CALIBRATION = ROOT / "configs" / "synccache" / "peers.json"
METHODS = ("none", "synccache", "synccache-stream", "fora", "teacache", "fbcache", "magcache", "deepcache")
INTERVAL_METHODS = ("fora", "deepcache")
SYNCCACHE_METHODS = ("synccache", "synccache-stream")  # the methods that follow SyncCache's plans


def cache_config(method: str, steps: int, threshold=None, schedule=None, calibration=None, stream_schedule=None,
                 share_guidance=False):
    """-> None (uncached), a SyncCacheConfig or a BaselineConfig; ValueError with one clear line.

    threshold: synccache (probe mode instead of the schedule), teacache, fbcache, magcache: the reuse
    threshold; fora and deepcache: the interval N (an integer). share_guidance (synccache methods): a guided
    step runs the heavy blocks once for both halves of its batch (SyncCacheConfig.share_guidance).
    """
    if method not in METHODS:
        raise ValueError(f"unknown cache method {method!r}; expected one of {', '.join(METHODS)}")
    if share_guidance and method not in SYNCCACHE_METHODS:
        raise ValueError(f"share_guidance is SyncCache's (synccache, synccache-stream), not {method}'s")
    if method == "none":
        if threshold is not None:
            raise ValueError("a cache threshold needs a cache method (--cache ...)")
        return None
    if method in SYNCCACHE_METHODS:
        from synccache import Schedule, SyncCacheConfig
        stream = method == "synccache-stream"
        if threshold is not None:
            if stream:
                raise ValueError("synccache-stream follows its schedule; it takes no threshold")
            return SyncCacheConfig(threshold=float(threshold), share_guidance=share_guidance)
        if stream:
            path = Path(stream_schedule) if stream_schedule else DEFAULT_STREAM_SCHEDULE
        else:
            path = Path(schedule) if schedule else DEFAULT_SCHEDULE
        if not path.exists():
            raise ValueError(f"SyncCache schedule not found: {path} (make one with `syncavatar calibrate`)")
        sched = Schedule.load(path)
        if sched.steps != steps:
            raise ValueError(f"SyncCache schedule {path} was solved for {sched.steps} steps, not {steps}: "
                             f"run `syncavatar calibrate --steps {steps} --out FILE` and pass it")
        return SyncCacheConfig(schedule=sched, stream=stream, share_guidance=share_guidance)
    from synccache.baselines import BaselineConfig
    kw = {"steps": steps}
    if method in INTERVAL_METHODS:
        if threshold is not None:
            if float(threshold) != int(threshold):
                raise ValueError(f"{method} takes an integer interval as its threshold, got {threshold}")
            kw["interval"] = int(threshold)
    elif threshold is not None:
        kw["threshold"] = float(threshold)
    if method in ("teacache", "magcache"):
        path = Path(calibration) if calibration else DEFAULT_CALIBRATION
        if not path.exists():
            raise ValueError(f"{method} needs its calibration file {path} (made by `syncavatar calibrate`)")
        kw["calibration"] = str(path)
    return BaselineConfig(method=method, **kw)


def attach(dit, cache):
    """Attach a SyncCacheConfig or BaselineConfig to the DiT -> handle (reset / stats / remove)."""
    from synccache import SyncCacheConfig, apply_synccache, reference_layout
    from synccache.baselines import BaselineConfig, apply_baseline
    layout = reference_layout(dit)
    if isinstance(cache, SyncCacheConfig):
        return apply_synccache(dit, cache, layout)
    if isinstance(cache, BaselineConfig):
        return apply_baseline(dit, cache, layout)
    raise TypeError(f"cache must be a SyncCacheConfig or BaselineConfig, got {type(cache).__name__}")


def cache_name(cache) -> str:
    """The method name a config stands for ('none' for None)."""
    if cache is None:
        return "none"
    if getattr(cache, "stream", False):
        return "synccache-stream"
    return getattr(cache, "method", "synccache")
