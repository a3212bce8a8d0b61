"""`syncavatar calibrate`: measure span reuse errors on calibration clips, solve the schedule by DP.

Calibration clips are corpus clips of the *train* split (voices and sentences the held-out benchmark
never uses), made on the fly unless --corpus gives a directory. Every chunk is generated exactly as the
renderer does (same steps, guidance, motion tokens) from the clip's microphone-like audio (the corpus's
augmented `audio`: gain, phone band, EQ tilt, echo, noise, clipping, as users' microphones give; never
`audio_clean`), from one chunk before the speech starts, while synccache.calibrate.SpanErrorRecorder
measures the error of bypassing each span at each step, weighted towards the face and the mouth
(ChunkCondition.output_weight) unless error_weight="uniform"; synccache.schedule.plan then picks which
spans keep residuals (the budget) and on which steps they are reused.
"""
from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from synccache import ScheduleError, max_spans_for_bytes, plan, reference_layout
from synccache.schedule import one_step_errors
from synccache.calibrate import SpanErrorRecorder

from engine.model.dit import OUTPUT_WEIGHT_NAME

DEFAULT_SCHEDULE_DIR = Path(__file__).resolve().parents[1] / "configs" / "synccache"
# calibrate(error_weight=...) -> the name a schedule's meta "error_weight" records
ERROR_WEIGHTS = {"mouth": OUTPUT_WEIGHT_NAME, "uniform": "uniform"}
DEFAULT_CLIPS, DEFAULT_CHUNKS_PER_CLIP = 6, 8  # 48 chunks, as 4 clips x 12 were, over 6 voices and faces
SPEECH_OPENNESS = 0.05  # a frame whose ground-truth mouth openness exceeds this is speech


def parse_budget(text: str, span_bytes: int, n_spans: int) -> int:
    """'3' -> 3 spans; '512K' / '1M' / '300000B' -> as many span residuals as fit in those bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B|[KMG])?\s*", str(text), re.I)
    if not m:
        raise ValueError(f"budget must be a span count (e.g. 3) or a size (e.g. 512K, 1M), got {text!r}")
    value, unit = float(m.group(1)), (m.group(2) or "").upper()
    if not unit:
        if value != int(value):
            raise ValueError(f"a span-count budget must be an integer, got {text!r}")
        return min(int(value), n_spans)
    scale = {"B": 1, "K": 1024, "KB": 1024, "M": 1024 ** 2, "MB": 1024 ** 2, "G": 1024 ** 3, "GB": 1024 ** 3}[unit]
    return min(max_spans_for_bytes(int(value * scale), span_bytes), n_spans)


def calibration_clips(n: int, corpus: str | None = None, seed: int = 7) -> list[dict]:
    """n clips from a corpus dir, or freshly made train-split clips (seed 7: not the training corpus)."""
    from engine.data.corpus import build_corpus
    if corpus is None:  # made, read into memory, removed
        with tempfile.TemporaryDirectory(prefix="syncavatar-calib-") as tmp:
            build_corpus(tmp, clips=n, seed=seed, split="train", progress=False)
            return calibration_clips(n, tmp)
    files = sorted(Path(corpus).glob("clip_*.npz"))[:n]
    if not files:
        raise FileNotFoundError(f"no clip_*.npz in {corpus}")
    return [dict(np.load(f)) for f in files]


def first_chunk(clip, frames) -> int:
    """Index of the chunk before the one where the clip's speech starts (0 for a clip without speech).

    Clips open with 0.15-0.8 s of silence (up to 5 chunks of 4 frames); starting one chunk before the
    speech keeps a session's silent start and its onset, and spends the chunks on speech, as the live
    engine (VAD-gated) does."""
    speech = np.flatnonzero(np.asarray(clip["openness"]) > SPEECH_OPENNESS)
    return max(0, int(speech[0]) // frames - 1) if len(speech) else 0


def _chunks(model, clips, max_chunks, from_speech=True):
    """[(clip, chunk index)] in order: up to max_chunks consecutive chunks of each clip."""
    todo = []
    w = model.cfg.frames
    for c in clips:
        total = int(np.ceil(len(c["openness"]) / w))
        start = first_chunk(c, w) if from_speech else 0
        todo += [(c, k) for k in range(start, min(total, start + max_chunks))]
    return todo


def run_chunks(model, clips, steps, guidance, noise_scale, max_chunks=DEFAULT_CHUNKS_PER_CLIP, fixed_noise=False,
               before_chunk=None, progress=True, desc="calibrate", from_speech=True):
    """Generate up to max_chunks consecutive chunks of every clip in order, as the renderer does (uncached),
    from the clip's augmented (microphone-like) audio, clip["audio"].

    from_speech: start one chunk before the speech starts (first_chunk), else at the clip's start.
    before_chunk(i) is called before the i-th chunk of each clip (i = 0 starts a new session)."""
    from tqdm import tqdm

    from engine.generator import Avatar, ChunkGenerator
    gen, last, i = None, None, 0
    for c, k in tqdm(_chunks(model, clips, max_chunks, from_speech), desc=desc, unit="chunk",
                     disable=not progress):
        if c is not last:
            avatar = Avatar("calib", c["ref"], c["ref_person_mask"].astype(bool), c["ref_face_mask"].astype(bool))
            gen = ChunkGenerator(model, avatar, steps=steps, guidance=guidance, noise_scale=noise_scale,
                                 fixed_noise=fixed_noise)
            audio = torch.from_numpy(c["audio"].astype(np.float32))  # augmented, as a microphone gives
            last, i = c, 0
        if before_chunk is not None:
            before_chunk(i)
        gen.chunk(audio, k * model.cfg.frames)
        i += 1


def record_errors(model, clips, steps, guidance, noise_scale, cross=False, progress=True, max_age=1, forecast=0,
                  error_weight="mouth", max_chunks=DEFAULT_CHUNKS_PER_CLIP):
    """(err, cross_err or None, chunks): span reuse errors averaged over the chunks, [span][step], or with
    max_age > 1 [span][step][age - 1] (SpanErrorRecorder.errors_by_age, residuals forecast if asked).

    error_weight: "mouth" weighs each error by the chunk's output weight (face x4, mouth x16:
    ChunkCondition.output_weight), "uniform" prices every latent element alike."""
    if error_weight not in ERROR_WEIGHTS:
        raise ValueError(f"error weight must be one of {sorted(ERROR_WEIGHTS)}, got {error_weight!r}")
    rec = SpanErrorRecorder(model.dit, reference_layout(model.dit), cross=cross, max_age=max_age,
                            forecast=forecast, weighted=error_weight != "uniform")
    try:
        run_chunks(model, clips, steps, guidance, noise_scale, max_chunks=max_chunks, fixed_noise=cross,
                   before_chunk=lambda i: rec.reset(next_chunk=i > 0), progress=progress,
                   desc="calibrate (stream)" if cross else "calibrate")
        if error_weight != "uniform" and rec.uniform_steps:
            raise RuntimeError(f"{rec.uniform_steps} calibration steps had no output weight "
                               "(ChunkCondition.output_weight); the errors would not be weighted as recorded")
        err = rec.errors_by_age() if max_age > 1 else rec.errors()
        return err, (rec.cross_errors() if cross else None), rec.samples()
    finally:
        rec.remove()


def solve(err, steps, max_spans, spans, reuse_fraction=0.9, error_bound=None, max_run=6, warmup=1):
    """The DP schedule: the least-error plan with reuse_fraction of the budgeted span-steps reused, or the
    plan with the most reuses under error_bound."""
    if error_bound is not None:
        return plan(err, max_spans, error_bound=error_bound, warmup=warmup, max_run=max_run, spans=spans)
    reuses = int(round(reuse_fraction * max_spans * (steps - max(warmup, 1))))
    try:
        return plan(err, max_spans, reuses=reuses, warmup=warmup, max_run=max_run, spans=spans)
    except ScheduleError:
        raise ValueError(f"{reuses} reused span-steps are not possible with {max_spans} cached spans, "
                         f"warmup {warmup} and max run {max_run}") from None


def add_cross(sched, err, cross_err):
    """Streaming extension: on span-steps the schedule computes, take the previous chunk's residual where
    that is no worse than the worst reuse the schedule already accepts."""
    accepted = [err[s][t] for s, row in enumerate(sched.reuse) for t, r in enumerate(row) if r]
    limit = max(accepted) if accepted else 0.0
    cached = set(sched.cached_spans)
    sched.cross = [[bool(s in cached and not sched.reuse[s][t] and np.isfinite(cross_err[s][t])
                         and cross_err[s][t] <= limit) for t in range(sched.steps)] for s in range(sched.num_spans)]
    sched.meta["cross_limit"] = round(limit, 5)
    return sched


def _resolve(errors_from, out, steps, budget, reuse_fraction, error_bound, max_run, warmup, plot,
             error_weight=None):
    """calibrate(errors_from=...): a new plan from a schedule file's recorded errors (weighted as they were:
    meta "error_weight"; files from before it was recorded hold uniform errors)."""
    from synccache import Schedule
    src = Schedule.load(errors_from)
    if src.steps != steps:
        raise ValueError(f"{errors_from} was calibrated for {src.steps} steps, not {steps} (--steps)")
    meta = dict(src.meta)
    if "span_errors" not in meta:
        raise ValueError(f"{errors_from} holds no recorded errors (meta 'span_errors')")
    err = errors_from_meta(meta)
    meta.setdefault("error_weight", "uniform")  # every schedule made before the weighting
    if error_weight is not None and ERROR_WEIGHTS.get(error_weight, error_weight) != meta["error_weight"]:
        raise ValueError(f"{errors_from} recorded errors weighted {meta['error_weight']!r}, not "
                         f"{ERROR_WEIGHTS.get(error_weight, error_weight)!r} (--error-weight): that needs a new "
                         "calibration")
    if any(isinstance(v, list) for row in err for v in row) and max_run is not None:
        ages = min(len(v) for row in err for v in row if isinstance(v, list))
        if max_run > ages:
            raise ValueError(f"{errors_from} recorded errors for residuals up to {ages} steps old: "
                             f"--max-run {max_run} needs a new calibration")
    max_spans = parse_budget(budget, meta.get("span_bytes", 1), src.num_spans)
    if max_spans < 1:
        raise ValueError(f"budget {budget!r} holds no span residual")
    sched = solve(err, steps, max_spans, src.spans, reuse_fraction, error_bound, max_run, warmup)
    for k in ("solver", "max_spans", "max_run", "error_bound", "reuses", "warmup"):
        meta.pop(k, None)
    sched.meta |= meta | {"budget": str(budget), "reuse_fraction": reuse_fraction if error_bound is None else None,
                          "warmup": warmup, "errors_from": str(errors_from)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sched.save(out)
    if plot:
        plot_schedule(one_step_errors(err), sched, plot)
    return {"out": str(out), "steps": steps, "spans": src.num_spans, "cached_spans": sched.cached_spans,
            "reused_span_steps": sched.reuse_count, "computed_span_steps": src.num_spans * steps - sched.reuse_count,
            "predicted_error": round(sched.error, 5), "errors_from": str(errors_from),
            "error_weight": meta["error_weight"]}


def _table(err):
    """JSON-able error table (inf -> None); entries may be lists by age."""
    def cell(v):
        if isinstance(v, (list, tuple)):
            return [cell(x) for x in v]
        return round(v, 5) if np.isfinite(v) else None
    return [[cell(v) for v in row] for row in err]


def errors_from_meta(meta) -> list:
    """The error table a schedule's calibration stored (None -> inf), by age where it was recorded so."""
    def cell(v):
        if isinstance(v, list):
            return [cell(x) for x in v]
        return math.inf if v is None else float(v)
    return [[cell(v) for v in row] for row in meta["span_errors"]]


def calibrate(model, out, steps, budget, clips=DEFAULT_CLIPS, corpus=None, reuse_fraction=0.9, error_bound=None,
              max_run=6, warmup=1, guidance=None, noise_scale=None, plot=None, stream_out=None,
              peers_out=None, progress=True, forecast=0, errors_from=None, error_weight=None,
              chunks_per_clip=DEFAULT_CHUNKS_PER_CLIP) -> dict:
    """Measure, solve, save the schedule JSON (and the streaming schedule, and the peers' calibration).

    error_weight: "mouth" (the default) weighs each reuse error towards the face (x4) and the mouth (x16),
    "uniform" prices every latent element alike; the schedule's meta "error_weight" records which
    (OUTPUT_WEIGHT_NAME, e.g. "face4_mouth16", or "uniform"). With errors_from it defaults to the file's
    and must match it when given. clips x chunks_per_clip: the calibration set (chunks_per_clip consecutive
    chunks of each clip from just before its speech).

    errors_from: a schedule JSON whose calibration already recorded the errors (its meta): solve again
    from them (another reuse fraction, budget or bound) without recording; its steps, guidance, noise,
    forecast and calibration set are kept, and nothing else (stream, peers) is made.

    forecast: written into the schedule (SyncCacheConfig.forecast follows it); 1 stores a slope next to
    each residual, so a span costs twice the bytes of the budget. The errors are recorded by residual age
    (1..max_run steps old, forecast as the hooks will) so that the DP prices runs of reuses by their real
    staleness; the streaming schedule keeps one-step errors.
    """
    from synccache.baselines import calibrate_baselines, save_calibration

    from engine.sampler import DEFAULT_GUIDANCE, DEFAULT_NOISE_SCALE
    if errors_from is not None:
        return _resolve(errors_from, out, steps, budget, reuse_fraction, error_bound, max_run, warmup, plot,
                        error_weight)
    error_weight = "mouth" if error_weight is None else error_weight
    if error_weight not in ERROR_WEIGHTS:
        raise ValueError(f"error weight must be one of {sorted(ERROR_WEIGHTS)}, got {error_weight!r}")
    if chunks_per_clip < 1:
        raise ValueError(f"chunks per clip must be >= 1, got {chunks_per_clip}")
    guidance = DEFAULT_GUIDANCE if guidance is None else guidance
    noise_scale = DEFAULT_NOISE_SCALE if noise_scale is None else noise_scale
    layout = reference_layout(model.dit)
    spans = layout.spans()
    cfg = model.cfg
    tokens = 1 + cfg.motion_frames + cfg.frames
    batch = 2 if guidance != 1.0 else 1
    span_bytes = batch * tokens * cfg.tokens_per_frame * cfg.hidden * 4  # one float32 residual
    span_bytes *= 2 if forecast else 1  # and its slope
    max_spans = parse_budget(budget, span_bytes, len(spans))
    if max_spans < 1:
        raise ValueError(f"budget {budget!r} holds no span residual ({span_bytes} bytes each)")
    data = calibration_clips(clips, corpus)
    meta = {"steps": steps, "guidance": guidance, "noise_scale": noise_scale, "budget": str(budget),
            "span_bytes": span_bytes, "calibration_clips": len(data), "warmup": warmup,
            "reuse_fraction": reuse_fraction if error_bound is None else None, "forecast": int(forecast),
            "error_weight": ERROR_WEIGHTS[error_weight], "chunks_per_clip": chunks_per_clip}
    err, _, samples = record_errors(model, data, steps, guidance, noise_scale, progress=progress,
                                    max_age=min(max_run or steps - 1, steps - 1), forecast=forecast,
                                    error_weight=error_weight, max_chunks=chunks_per_clip)
    sched = solve(err, steps, max_spans, spans, reuse_fraction, error_bound, max_run, warmup)
    sched.meta |= meta | {"calibration_chunks": samples, "span_errors": _table(err)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sched.save(out)
    summary = {"out": str(out), "steps": steps, "spans": len(spans), "cached_spans": sched.cached_spans,
               "reused_span_steps": sched.reuse_count,
               "computed_span_steps": len(spans) * steps - sched.reuse_count,
               "predicted_error": round(sched.error, 5), "calibration_chunks": samples,
               "error_weight": ERROR_WEIGHTS[error_weight]}
    if plot:
        plot_schedule(one_step_errors(err), sched, plot)
    if stream_out:
        serr, xerr, _ = record_errors(model, data, steps, guidance, noise_scale, cross=True, progress=progress,
                                      error_weight=error_weight, max_chunks=chunks_per_clip)
        ssched = add_cross(solve(serr, steps, max_spans, spans, reuse_fraction, error_bound, max_run, warmup),
                           serr, xerr)
        ssched.meta |= meta | {"calibration_chunks": samples, "span_errors": _table(serr),
                               "cross_errors": _table(xerr), "fixed_noise": True}
        ssched.save(stream_out)
        summary |= {"stream_out": str(stream_out), "stream_cross_span_steps": ssched.cross_count}
    if peers_out:
        cal = calibrate_baselines(model.dit, layout, lambda: run_chunks(
            model, data, steps, guidance, noise_scale, max_chunks=6, progress=progress, desc="calibrate peers"),
            steps)
        save_calibration(cal, peers_out)
        summary["peers_out"] = str(peers_out)
    return summary


def plot_schedule(err, sched, path):
    """Heat map of the span reuse errors with the chosen reuse steps marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    e = np.array([[v if np.isfinite(v) else np.nan for v in row] for row in err])
    fig, ax = plt.subplots(figsize=(8, 2.6))
    im = ax.imshow(e, aspect="auto", cmap="viridis")
    for s, row in enumerate(sched.reuse):
        for t, r in enumerate(row):
            if r:
                ax.text(t, s, "R", ha="center", va="center", color="white", fontsize=8)
    ax.set_xticks(range(sched.steps))
    ax.set_yticks(range(sched.num_spans))
    ax.set_xlabel("denoising step")
    ax.set_ylabel("span")
    ax.set_title("error of reusing a span's residual (R = reused in the schedule)")
    weight = sched.meta.get("error_weight", "uniform")
    fig.colorbar(im, ax=ax, label="rel. L1 of the step output" + ("" if weight == "uniform" else f"\n({weight})"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

