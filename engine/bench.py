"""`syncavatar bench cache`: every cache method at several settings on held-out clips, against uncached.

For each clip the uncached model and every method/setting render side by side in lockstep, one chunk
each in turn (the order rotates every chunk), so the machine's speed drift hits them alike. Per method
and setting, over clips:
- `speedup`: median over clips of uncached DiT time / the method's DiT time (same process, same clip,
  same minutes);
- `rtf`: median generation time (time in the generator's chunk calls) / audio duration;
- `psnr`, `ssim`: frames vs the uncached frames (mean over frames, then clips). Generation is
  autoregressive (each chunk continues from the last chunk's latents), so a small difference in one chunk
  shifts every later one (head sway and blinks are not tied to the audio and wander off): this measures
  the cache and the drift together;
- `psnr_chunk`: the same, with every chunk given the uncached run's motion latents (teacher-forced), so
  it measures what the cache changes within a chunk, without the autoregressive drift;
- `sync_conf`, `offset_frames`: the lip-sync expert on the method's frames with the clip's audio;
- `face_psnr`: the face against the closest clean render of the avatar (engine/picture.py, every 4th
  frame, median), which sees noise, blur and ghosting that PSNR against the uncached frames cannot;
- worst clip: `psnr_min`, `sync_drop_max` and `face_psnr_drop_max` (drops against the uncached run on
  the same clip), so a default can be held to every clip and not only to the average;
- `computed_steps`, `reused_steps`, `cache_bytes`.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from engine.audio import FPS, SAMPLE_RATE
from engine.picture import psnr


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over frames of uint8 [T, H, W, 3] stacks (scikit-image)."""
    from skimage.metrics import structural_similarity
    return float(np.mean([structural_similarity(x, y, channel_axis=-1, data_range=255) for x, y in zip(a, b)]))


def load_clips(corpus, n):
    files = sorted(Path(corpus).glob("clip_*.npz"))[:n]
    if not files:
        raise FileNotFoundError(f"no clip_*.npz in {corpus}")
    return [dict(np.load(f)) for f in files]


PICTURE_STRIDE = 4  # face_psnr on every 4th frame (a fit per frame costs ~40 ms)


def bench_cache(model, methods, corpus="data/heldout", clips=6, progress=True) -> dict:
    """methods: list of (name, label, cache config or None). Returns {"rows": [...], "clips": [...]}."""
    from tqdm import tqdm

    from engine.generator import Avatar, ChunkGenerator
    from engine.lipsync import evaluate_arrays
    from engine.picture import face_psnr
    data = load_clips(corpus, clips)
    per = {label: [] for _, label, _ in methods}
    bar = tqdm(total=sum(-(-len(c["openness"]) // model.cfg.frames) for c in data), desc="bench cache",
               unit="chunk", disable=not progress)
    for c in data:
        avatar = Avatar("bench", c["ref"], c["ref_person_mask"].astype(bool), c["ref_face_mask"].astype(bool))
        audio_t = torch.from_numpy(c["audio"].astype(np.float32))
        runs = _lockstep(model, avatar, audio_t, methods, bar)
        base, base_stats = runs[None]
        motions = _uncached_motions(ChunkGenerator(model, avatar), audio_t, len(base))
        ident = json.loads(str(c["meta"]))["identity"]
        base_lip = evaluate_arrays(base, c["audio"])
        base_face = face_psnr(base, ident, PICTURE_STRIDE)["median"]
        for name, label, cache in methods:
            frames, stats = runs[label]
            lip = evaluate_arrays(frames, c["audio"]) if cache is not None else base_lip
            face = face_psnr(frames, ident, PICTURE_STRIDE)["median"] if cache is not None else base_face
            gen = ChunkGenerator(model, avatar, cache=cache)
            try:
                forced = _teacher_forced(gen, audio_t, motions)[:len(base)]
            finally:
                gen.close()
            per[label].append({
                "method": name, "speedup": base_stats["dit_ms"] / max(stats["dit_ms"], 1e-6),
                "rtf": stats["rtf"], "base_rtf": base_stats["rtf"], "wall_s": stats["total_ms"] / 1000,
                "psnr": psnr(frames, base), "ssim": ssim(frames, base), "psnr_chunk": psnr(forced, base),
                "sync_conf": lip["sync_conf"], "offset_frames": lip["offset_frames"],
                "sync_drop": base_lip["sync_conf"] - lip["sync_conf"], "face_psnr": face,
                "face_psnr_drop": base_face - face, "computed_steps": stats.get("computed_steps"), "reused_steps": stats.get("reused_steps"),
                "cache_bytes": stats.get("cache_bytes", 0)})
    bar.close()
    rows = []
    for name, label, _ in methods:
        r = per[label]
        rows.append({"method": name, "setting": label,
                     "speedup": float(np.median([x["speedup"] for x in r])),
                     "rtf": float(np.median([x["rtf"] for x in r])),
                     "base_rtf": float(np.median([x["base_rtf"] for x in r])),
                     "psnr": float(np.mean([x["psnr"] for x in r])),
                     "psnr_chunk": float(np.mean([x["psnr_chunk"] for x in r])), "ssim": float(np.mean([x["ssim"] for x in r])),
                     "sync_conf": float(np.mean([x["sync_conf"] for x in r])),
                     "face_psnr": float(np.mean([x["face_psnr"] for x in r])),
                     "psnr_min": float(min(x["psnr"] for x in r)),
                     "sync_drop_max": float(max(x["sync_drop"] for x in r)),
                     "face_psnr_drop_max": float(max(x["face_psnr_drop"] for x in r)),
                     "max_abs_offset": int(max(abs(x["offset_frames"]) for x in r)),
                     "reused_frac": float(np.sum([x["reused_steps"] or 0 for x in r])
                                          / max(1, np.sum([(x["reused_steps"] or 0) + (x["computed_steps"] or 0)
                                                           for x in r]))),
                     "cache_bytes": int(max(x["cache_bytes"] or 0 for x in r))})
    result = {"clips": len(data), "corpus": str(corpus), "rows": rows, "per_clip": per}
    result["matched"] = matched(rows)
    return result


SYNCCACHE_ROWS = ("synccache", "synccache-probe")  # the paper's method (schedule or probe), not the extension


def matched(rows, tol=0.10, psnr_margin=1.0, sync_margin=0.05):
    """Per peer setting: among SyncCache settings within +-tol of its speedup, the one that beats it by most
    (PSNR gain in units of psnr_margin dB, or sync_conf gain in units of sync_margin, whichever is larger),
    and whether that reaches 1: >= psnr_margin dB whole-video PSNR or >= sync_margin sync_conf (issue 3)."""
    ours = [r for r in rows if r["method"] in SYNCCACHE_ROWS]
    out = []
    for p in rows:
        if p["method"] in SYNCCACHE_ROWS or p["method"] in ("none", "synccache-stream"):
            continue
        near = [r for r in ours if abs(r["speedup"] / p["speedup"] - 1) <= tol]
        row = {"peer": p["setting"], "peer_speedup": p["speedup"], "peer_psnr": p["psnr"],
               "peer_sync_conf": p["sync_conf"], "synccache": None, "wins": False}
        if near:
            def margin(r):
                return max((r["psnr"] - p["psnr"]) / psnr_margin, (r["sync_conf"] - p["sync_conf"]) / sync_margin)
            best = max(near, key=margin)
            row |= {"synccache": best["setting"], "speedup": best["speedup"], "d_psnr": best["psnr"] - p["psnr"],
                    "d_sync_conf": best["sync_conf"] - p["sync_conf"], "wins": margin(best) >= 1.0}
        out.append(row)
    return out


def _lockstep(model, avatar, audio_t, methods, bar=None):
    """Render one clip with the plain model and with every method, chunk by chunk in lockstep: at each
    chunk every generator makes its next chunk, in an order that rotates from chunk to chunk. This
    machine's speed drifts by tens of percent within a minute; in lockstep the drift hits every method
    alike, so speedups are ratios of time spent side by side.
    -> {None: (plain frames, stats), label: (frames, stats)}; stats as render_frames' (dit_ms, total_ms =
    time in the generator's chunk calls, rtf, computed/reused steps, cache_bytes)."""
    import copy

    from engine.generator import ChunkGenerator
    total = max(1, math.ceil(len(audio_t) / SAMPLE_RATE * FPS))
    w = model.cfg.frames
    gens = {None: ChunkGenerator(model, avatar)}
    for _, label, cache in methods:  # hooks attach to the DiT: one copy of the model per cached method
        gens[label] = ChunkGenerator(copy.deepcopy(model) if cache is not None else model, avatar, cache=cache)
    keys = list(gens)
    frames = {k: [] for k in keys}
    wall = dict.fromkeys(keys, 0.0)
    try:
        for ci in range(-(-total // w)):
            r = ci % len(keys)
            for k in keys[r:] + keys[:r]:
                t0 = time.perf_counter()
                frames[k].append(gens[k].chunk(audio_t, ci * w))
                wall[k] += time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
        out = {}
        audio_s = len(audio_t) / SAMPLE_RATE
        for k, g in gens.items():
            out[k] = (np.concatenate(frames[k])[:total],
                      {"dit_ms": g.timer["dit_ms"], "total_ms": wall[k] * 1000, "rtf": wall[k] / audio_s}
                      | g.cache_stats())
    finally:
        for g in gens.values():
            g.close()
    return out


def _uncached_motions(gen, audio_t, frames):
    """Motion latents the uncached generator feeds each chunk."""
    w = gen.cfg.frames
    motions = []
    for k in range(-(-frames // w)):
        motions.append(gen.motion)
        gen.chunk(audio_t, k * w)
    return motions


def _teacher_forced(gen, audio_t, motions):
    """Every chunk from the given motion latents instead of the generator's own last chunk."""
    out = []
    for k, m in enumerate(motions):
        gen.motion = m
        out.append(gen.chunk(audio_t, k * gen.cfg.frames))
    return np.concatenate(out)


def pareto_plot(result: dict, path, uncached_sync=None):
    """Speed-quality plot: DiT speedup vs PSNR and vs sync_conf, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    by = {}
    for r in result["rows"]:
        by.setdefault(r["method"], []).append(r)
    for name, rs in by.items():
        rs = sorted(rs, key=lambda r: r["speedup"])
        x = [r["speedup"] for r in rs]
        axes[0].plot(x, [r["psnr"] for r in rs], "o-", label=name)
        axes[1].plot(x, [r["sync_conf"] for r in rs], "o-", label=name)
    axes[0].set_ylabel("PSNR vs uncached frames (dB)")
    axes[1].set_ylabel("sync_conf (lip-sync expert)")
    if uncached_sync is not None:
        axes[1].axhline(uncached_sync, color="k", ls=":", lw=1, label="uncached")
    for ax in axes:
        ax.set_xlabel("DiT speedup vs uncached (x)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"cache methods on {result['clips']} held-out clips (higher right is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(result, path):
    Path(path).write_text(json.dumps(result, indent=1))


def default_sweep(steps, schedule_path, calibration_path, stream_schedule_path=None, only=None):
    """(method, label, config) for every method at a few settings; SyncCache's shipped schedule first.

    SyncCache's other settings are re-solved by DP from the span errors the shipped schedule's
    calibration recorded (its meta), at other reuse fractions, with the shipped schedule's forecast setting;
    no new calibration runs. A forecasting schedule is also run without its forecast (plain reuse).
    """
    from synccache import Schedule, ScheduleError, SyncCacheConfig, plan

    from engine.caching import cache_config
    from engine.calibrate import errors_from_meta
    out = [("none", "none", None)]
    sched = Schedule.load(schedule_path)
    out.append(("synccache", f"synccache(schedule {sched.reuse_count} reuses)",
                cache_config("synccache", steps, schedule=schedule_path)))
    err = errors_from_meta(sched.meta)
    shipped, forecast = sched.reuse_count, int(sched.meta.get("forecast", 0))
    if forecast:  # the same plan without the forecast: what the paper's plain reuse gives
        out.append(("synccache", f"synccache(schedule {shipped} reuses, no forecast)",
                    SyncCacheConfig(schedule=sched, forecast=0)))
    for frac in (0.2, 0.4, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95):  # 0.93+: the fastest peers
        k = int(round(frac * len(err) * (steps - 1)))
        if k != shipped:
            try:
                alt = plan(err, len(err), reuses=k, warmup=sched.meta.get("warmup", 1),
                           max_run=sched.meta.get("max_run"), spans=sched.spans)
            except ScheduleError:  # not reachable with this max_run
                continue
            out.append(("synccache", f"synccache(schedule {k} reuses)",
                        SyncCacheConfig(schedule=alt, forecast=forecast)))
    if stream_schedule_path is not None and Path(stream_schedule_path).exists():
        out.append(("synccache-stream", "synccache-stream", cache_config(
            "synccache-stream", steps, stream_schedule=stream_schedule_path)))
    for thr in (0.1, 0.3):
        out.append(("synccache-probe", f"synccache-probe({thr:g})", cache_config("synccache", steps, thr)))
    for n in (2, 3, 4, 5):
        out.append(("fora", f"fora(N={n})", cache_config("fora", steps, n)))
    for method, thrs in (("teacache", (0.1, 0.3, 0.6, 1.0)), ("fbcache", (0.05, 0.1, 0.2, 0.4)),
                         ("magcache", (0.06, 0.12, 0.25, 0.5))):
        for thr in thrs:
            out.append((method, f"{method}({thr:g})", cache_config(method, steps, thr, calibration=calibration_path)))
    out.append(("deepcache", "deepcache", cache_config("deepcache", steps)))
    if only:
        unknown = set(only) - {m for m, _, _ in out}
        if unknown:
            raise ValueError(f"unknown bench methods {sorted(unknown)}")
        out = [m for m in out if m[0] in only or m[0] == "none"]
    return out


def print_matched(result):
    """Markdown table: each peer setting against the best SyncCache setting at its speed (+-10%)."""
    print("| peer | speedup | PSNR | sync_conf | SyncCache at matched speed | speedup | dPSNR | dsync_conf | wins |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in result.get("matched", []):
        if m["synccache"] is None:
            print(f"| {m['peer']} | {m['peer_speedup']:.2f}x | {m['peer_psnr']:.1f} | {m['peer_sync_conf']:.3f} "
                  f"| none within 10% | | | | no |")
            continue
        print(f"| {m['peer']} | {m['peer_speedup']:.2f}x | {m['peer_psnr']:.1f} | {m['peer_sync_conf']:.3f} | "
              f"{m['synccache']} | {m['speedup']:.2f}x | {m['d_psnr']:+.1f} | {m['d_sync_conf']:+.3f} | "
              f"{'yes' if m['wins'] else 'no'} |")


def print_table(result):
    """Markdown table of the rows (what the README shows)."""
    print("| method | setting | DiT speedup | RTF | PSNR (dB) | worst clip PSNR | PSNR per chunk (dB) | SSIM | "
          "sync_conf | worst clip sync drop | face_psnr (dB) | worst clip face_psnr drop | max abs offset | "
          "reused steps | cache MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['method']} | {r['setting']} | {r['speedup']:.2f}x | {r['rtf']:.2f} | {r['psnr']:.1f} | "
              f"{r.get('psnr_min', float('nan')):.1f} | {r['psnr_chunk']:.1f} | {r['ssim']:.4f} | {r['sync_conf']:.3f} | "
              f"{r.get('sync_drop_max', float('nan')):+.3f} | {r.get('face_psnr', float('nan')):.1f} | "
              f"{r.get('face_psnr_drop_max', float('nan')):+.2f} | {r['max_abs_offset']} | "
              f"{100 * r['reused_frac']:.0f}% | {r['cache_bytes'] / 2**20:.2f} |")
