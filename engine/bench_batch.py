"""`syncavatar bench batch`: one chunk each of B sessions denoised as one batch, against the same B chunks
generated one after another, with the live SyncCache schedule on (the generation worker's two ways).

Per B (1, 2, 4 by default), in one process and in lockstep (the two ways alternate every round, so the
machine's drift hits both): `dit_ms` (time in DiT forwards) and `chunk_ms` (the whole chunk: audio
encoder, DiT, decoder) for the B chunks, as medians over rounds; `speedup` = separate / batched; the
chunks per second each way sustains; and `max_latent_diff` / `max_frame_diff`, how far a batched
session's chunk is from the same chunk alone.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from engine.audio import SAMPLE_RATE

CHUNK_START = 8  # frame: past the look-back window, so each chunk reads real audio


def _gens(model, cfg, n):
    from engine.generator import ChunkGenerator, load_avatar
    return [ChunkGenerator(model, load_avatar(str(i)), steps=cfg.live.steps, seed=i, guidance=cfg.model.guidance,
                           noise_scale=cfg.model.noise_scale) for i in range(n)]


def bench_batch(model, cfg, sizes=(1, 2, 4), rounds=5, threads=1, precision="fp32", progress=True) -> dict:
    """-> {"sizes": {B: {...}}, "threads", "precision", "steps", "chunk_s"} (see the module docstring)."""
    from tqdm import tqdm

    from engine.caching import attach, cache_config
    from engine.generator import chunk_batch
    torch.set_num_threads(threads)
    cache = cache_config("synccache", cfg.live.steps, schedule=cfg.path(cfg.live.levels[0].schedule),
                         stream_schedule=cfg.path(cfg.live.levels[0].schedule), calibration=cfg.path(cfg.cache.calibration))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    rng = np.random.default_rng(0)
    n_max = max(sizes)
    audio = [torch.from_numpy((0.1 * rng.standard_normal(SAMPLE_RATE * 3)).astype(np.float32)) for _ in range(n_max)]
    handle = attach(model.dit, cache)
    out = {}
    try:
        for b in tqdm(sizes, desc="bench batch", disable=not progress):
            sep, bat = {"dit": [], "chunk": []}, {"dit": [], "chunk": []}
            diffs = []
            for r in range(rounds + 1):  # round 0 warms up
                gens_a, gens_b = _gens(model, cfg, b), _gens(model, cfg, b)
                timer_a, timer_b = {}, {}
                t0 = time.perf_counter()
                alone = []
                with autocast():
                    for g, a in zip(gens_a, audio):
                        handle.reset(keep_stats=True)
                        g.timer = timer_a
                        alone.append(g.chunk(a, CHUNK_START))
                t1 = time.perf_counter()
                handle.reset(keep_stats=True)
                with autocast():
                    batched = chunk_batch(gens_b, audio[:b], [CHUNK_START] * b, timer=timer_b)
                t2 = time.perf_counter()
                if r == 0:
                    continue
                sep["dit"].append(timer_a["dit_ms"])
                sep["chunk"].append((t1 - t0) * 1000)
                bat["dit"].append(timer_b["dit_ms"])
                bat["chunk"].append((t2 - t1) * 1000)
                diffs.append((max((ga.last_latents - gb.last_latents).abs().max().item()
                                  for ga, gb in zip(gens_a, gens_b)),
                              max(int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(alone, batched))))
            med = {k: {m: float(np.median(v[m])) for m in v} for k, v in (("separate", sep), ("batched", bat))}
            out[b] = {"separate_dit_ms": round(med["separate"]["dit"], 1), "batched_dit_ms": round(med["batched"]["dit"], 1),
                      "separate_chunk_ms": round(med["separate"]["chunk"], 1),
                      "batched_chunk_ms": round(med["batched"]["chunk"], 1),
                      "dit_speedup": round(med["separate"]["dit"] / med["batched"]["dit"], 3),
                      "chunk_speedup": round(med["separate"]["chunk"] / med["batched"]["chunk"], 3),
                      "chunks_per_s_separate": round(1000 * b / med["separate"]["chunk"], 2),
                      "chunks_per_s_batched": round(1000 * b / med["batched"]["chunk"], 2),
                      "max_latent_diff": max(d[0] for d in diffs), "max_frame_diff": max(d[1] for d in diffs)}
    finally:
        handle.remove()
    chunk_s = model.cfg.frames / 25
    return {"sizes": out, "threads": threads, "precision": precision, "steps": cfg.live.steps, "rounds": rounds,
            "chunk_s": chunk_s, "chunks_per_s_needed_per_session": round(1 / chunk_s, 2)}


def plot(result: dict, path) -> None:
    """Bars: ms for B chunks, separate vs batched, with the real-time line of B sessions' 160 ms chunks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = sorted(result["sizes"], key=int)
    x = np.arange(len(sizes))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    sep = [result["sizes"][b]["separate_chunk_ms"] for b in sizes]
    bat = [result["sizes"][b]["batched_chunk_ms"] for b in sizes]
    ax.bar(x - 0.2, sep, 0.4, label="one after another")
    ax.bar(x + 0.2, bat, 0.4, label="one batch")
    ax.plot(x, [1000 * result["chunk_s"]] * len(sizes), "k--", label=f"{1000 * result['chunk_s']:.0f} ms of speech")
    ax.set_xticks(x, [f"B = {b}" for b in sizes])
    ax.set_ylabel("ms for one chunk of each of B sessions")
    ax.set_title(f"SyncCache on, {result['steps']} steps, {result['precision']}, {result['threads']} thread(s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(result: dict, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))
