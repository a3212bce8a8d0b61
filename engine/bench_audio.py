"""`syncavatar bench audio`: the audio path (engine/audio_path.py) on each backend available here.

Per backend, in one process and in lockstep (the backends take turns every round, so the machine's drift
hits all alike), medians over rounds, in the live setting (live steps, guidance batch, `precision`):
- `step_ms`: the audio path of one denoising step (every audio block once, on one chunk);
- `audio_chunk_ms`: the audio path of one chunk (log-mel, audio encoder and K/V once, plus every step);
- `reuse_cost`: c, a DiT forward on a step where SyncCache reuses every span, over a full forward: with
  f of the steps computed, the DiT speedup is 1 / (f + (1 - f) c);
- `chunk_ms`: one whole live chunk with SyncCache's live schedule (audio, DiT, decoder; CPU only: the
  reference generator runs on the CPU, so on `--device cuda` this is None);
- `setup_s`: export or compile time before the first call (ONNX Runtime reuses an export from the cache).
`parity_max_abs`: the largest abs difference of the backend's outputs (tokens, K/V, block outputs) from
torch's in fp32 on the same inputs. `default`: what `audio_backend = "auto"` picks by the same rule the
worker uses (the fastest `chunk_ms` among audio_path.candidates()). With `device="cuda"` the model and
inputs move to the GPU, timings synchronise the device, and `default` is TensorRT where it can run (the
`--device cuda` path has never run: no GPU was lent to this project yet).
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from engine import audio_path
from engine.audio import SAMPLE_RATE
from engine.bench_batch import CHUNK_START


def _inputs(model, cfg, guidance):
    """A chunk's audio window, its condition (guidance batch) and noisy latents."""
    from engine.generator import ChunkGenerator, load_avatar
    rng = np.random.default_rng(0)
    audio = torch.from_numpy((0.1 * rng.standard_normal(SAMPLE_RATE * 3)).astype(np.float32))
    gen = ChunkGenerator(model, load_avatar("0"), steps=cfg.live.steps, guidance=guidance)
    inputs = gen.inputs(audio, CHUNK_START, tokens=False)
    return gen, audio, inputs


def _all_reuse(steps, spans):
    from synccache import Schedule
    return Schedule(reuse=[[False] + [True] * (steps - 1) for _ in spans], spans=[list(s) for s in spans])


def _parity(model, path, window) -> float:
    """Max abs diff of path's tokens, K/V and block outputs from torch's, fp32, same inputs."""
    ref = audio_path.AudioPath(model)
    with torch.no_grad():
        feats = model.audio.features(window)
        t_ref, t = ref.tokens(feats), path.tokens(feats)
        diffs = [(t - t_ref).abs().max().item()]
        kv_ref, kv = ref.kv(t_ref), path.kv(t_ref)
        diffs += [(a - b).abs().max().item() for p, q in zip(kv_ref, kv) for a, b in zip(p, q)]
        n = model.cfg.frames * model.cfg.tokens_per_frame
        g = torch.Generator().manual_seed(0)
        dev = window.device
        for i in range(len(kv_ref)):
            for branch in (kv_ref[i], tuple(torch.zeros_like(v) for v in kv_ref[i])):  # audio and null audio
                x = torch.randn(window.shape[0], n, model.cfg.hidden, generator=g).to(dev)
                fm = torch.rand(window.shape[0], n, 1, generator=g).to(dev)
                bias = model.dit.audio_bias(dev)
                diffs.append((path.block(i, x, *branch, bias, fm) - ref.block(i, x, *branch, bias, fm)).abs().max().item())
    return float(max(diffs))


def bench_audio(model, cfg, backends=None, rounds=5, threads=1, precision="bf16", progress=True, device="cpu") -> dict:
    """-> {"backends": {name: {...}}, "parity_max_abs", "default", ...} (see the module docstring)."""
    from tqdm import tqdm

    from engine.caching import attach, cache_config
    from synccache import SyncCacheConfig, apply_synccache, reference_layout
    torch.set_num_threads(threads)
    guidance = cfg.model.guidance
    dev = torch.device(device)
    cpu = dev.type == "cpu"
    names = backends or [n for n in audio_path.BACKENDS if audio_path.unavailable(n, dev) is None]
    skipped = {n: audio_path.unavailable(n, dev) or "not selected" for n in audio_path.BACKENDS if n not in names}
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    sync = (lambda: None) if cpu else (lambda: torch.cuda.synchronize(dev))
    gen, audio, inputs = _inputs(model, cfg, guidance)  # built on the CPU, then moved
    model.to(dev)
    inputs = tuple(t.to(dev) for t in inputs)
    window = inputs[2]
    paths, setup_s, parity = {}, {}, {}
    for n in names:
        t0 = time.perf_counter()
        paths[n] = audio_path.make(n, model, device=dev)
        setup_s[n] = time.perf_counter() - t0
        parity[n] = _parity(model, paths[n], window)
    live = cache_config("synccache", cfg.live.steps, schedule=cfg.path(cfg.live.levels[0].schedule),
                        stream_schedule=cfg.path(cfg.live.levels[0].schedule), calibration=cfg.path(cfg.cache.calibration))
    layout = reference_layout(model.dit)
    reuse_all = SyncCacheConfig(schedule=_all_reuse(cfg.live.steps, layout.spans()),
                                forecast=live.forecast)
    ms = {n: {"step": [], "encode": [], "full": [], "reuse": [], "chunk": []} for n in names}
    x = inputs[-1]
    one, point9 = torch.ones(2, device=dev), torch.full((2,), 0.9, device=dev)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t0
    for r in tqdm(range(rounds + 1), desc="bench audio", disable=not progress):  # round 0 warms up (and compiles)
        for n in names:
            handle = audio_path.install(model, paths[n])
            with torch.no_grad(), autocast():
                cond, t_enc = timed(lambda: model.dit.prepare(*inputs[:2], model.audio(window), *inputs[3:5],
                                                              null_audio=guidance != 1.0))
                h, c = model.dit.embed(torch.cat([x, x]), one, cond)
                _, t_step = timed(lambda: [model.dit.audio_step(i, h, cond) for i in range(len(model.dit.audio_blocks))])
                _, t_full = timed(lambda: model.dit(torch.cat([x, x]), one, cond))
                cache = apply_synccache(model.dit, reuse_all, layout)
                model.dit(torch.cat([x, x]), one, cond)  # step 0: computes and stores
                _, t_reuse = timed(lambda: model.dit(torch.cat([x, x]), point9, cond))  # step 1: every span reused
                cache.remove()
                t_chunk = float("nan")
                if cpu:  # the reference generator (and the live worker) run on the CPU
                    live_handle = attach(model.dit, live)
                    gen.reset()
                    _, t_chunk = timed(lambda: gen.chunk(audio, CHUNK_START))
                    live_handle.remove()
            handle.remove()
            if r:
                for k, v in (("step", t_step), ("encode", t_enc), ("full", t_full), ("reuse", t_reuse),
                             ("chunk", t_chunk)):
                    ms[n][k].append(v * 1000)
    med = {n: {k: float(np.median(v)) for k, v in m.items()} for n, m in ms.items()}
    out = {n: {"step_ms": m["step"], "audio_chunk_ms": m["encode"] + cfg.live.steps * m["step"],
               "reuse_cost": m["reuse"] / m["full"], "full_step_ms": m["full"], "reuse_step_ms": m["reuse"],
               "chunk_ms": m["chunk"] if cpu else None, "setup_s": setup_s[n]} for n, m in med.items()}
    auto = [n for n in audio_path.candidates(dev) if n in out]
    speed = "chunk_ms" if cpu else "audio_chunk_ms"
    default = min(auto, key=lambda n: (out[n][speed], auto.index(n))) if auto else None
    return {"backends": out, "parity_max_abs": parity, "default": default, "auto_candidates": auto,
            "unavailable": skipped, "precision": precision, "threads": threads, "rounds": rounds,
            "steps": cfg.live.steps, "guidance": guidance, "schedule": cfg.live.levels[0].schedule,
            "audio_blocks": len(model.dit.audio_blocks), "device": str(dev),
            "cpu": _cpu() if cpu else torch.cuda.get_device_name(dev)}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def write_json(result, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))


def print_table(result):
    print(f"audio path, {result['steps']} live steps, {result['precision']}, {result['threads']} thread(s); "
          f"auto picks {result['default']}")
    print("backend      step ms  audio/chunk ms  reuse cost c  full step ms  reuse step ms  chunk ms  setup s  parity")
    for n, b in result["backends"].items():
        print(f"{n:12s} {b['step_ms']:7.2f} {b['audio_chunk_ms']:15.2f} {b['reuse_cost']:13.3f} "
              f"{b['full_step_ms']:13.2f} {b['reuse_step_ms']:14.2f} {b['chunk_ms'] or float('nan'):9.1f} "
              f"{b['setup_s']:8.1f}  "
              f"{result['parity_max_abs'][n]:.1e}")
    for n, why in result["unavailable"].items():
        print(f"{n:12s} not run: {why}")
