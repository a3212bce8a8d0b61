"""The live worker's two stages, timed as the worker runs them (bf16 autocast, one torch thread each, the
live SyncCache schedule, 10 steps with guidance): the DiT stage and the decoding of a chunk alone, both at
once on two threads of one process (the worker's DecodeStage) and in two processes, and the decoding of
the first frame, the other three, and all four at once. Nothing else may run while it measures.

    .venv/bin/python docs/live/stage_times.py docs/live/stop15/stages.json "stop 15, 20:3x UTC, Xeon with AMX"
"""
import json
import multiprocessing as mp
import sys
import threading
import time

import numpy as np
import torch

SECONDS = 10.0


def _setup():
    from engine.bench_audio import CHUNK_START, _inputs
    from engine.caching import attach, cache_config
    from engine.config import DEFAULT_CONFIG, load_config
    from engine.model.avatar import load_model
    cfg = load_config(DEFAULT_CONFIG)
    m = load_model(cfg.path(cfg.model.weights))
    gen, audio, _ = _inputs(m, cfg, cfg.model.guidance)
    handle = attach(m.dit, cache_config("synccache", cfg.live.steps, schedule=cfg.path(cfg.live.levels[0].schedule)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = _dit(handle, gen, audio, CHUNK_START)
    return handle, gen, audio, CHUNK_START, z


def _dit(handle, gen, audio, start):
    """Audio features + the DiT's steps of one chunk (motion carried, no decoding) -> latents [1, W, C, h, w]."""
    from engine.generator import denoise_batch
    handle.reset()  # the schedule starts again at step 0 (residuals belong to one chunk)
    return denoise_batch([gen], [audio], [start])


def _decode(gen, z):
    from engine.generator import decode_batch
    return decode_batch([gen], z)


def _loop(fn, until):
    """ms of each call of fn until the wall clock passes `until` (the first call dropped: it allocates)."""
    torch.set_num_threads(1)
    ms = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        while time.time() < until:
            t = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t) * 1000)
    return round(float(np.median(ms[1:])), 1)


def _process(what, until, out):
    torch.set_num_threads(1)
    handle, gen, audio, start, z = _setup()
    fn = (lambda: _dit(handle, gen, audio, start)) if what == "dit" else (lambda: _decode(gen, z))
    out.put((what, _loop(fn, until)))


def main():
    torch.set_num_threads(1)
    handle, gen, audio, start, z = _setup()
    dit = lambda: _dit(handle, gen, audio, start)  # noqa: E731
    dec = lambda: _decode(gen, z)  # noqa: E731
    r = {"machine": sys.argv[2] if len(sys.argv) > 2 else "", "seconds_each": SECONDS}
    r["alone_ms"] = {"dit": _loop(dit, time.time() + SECONDS), "decode": _loop(dec, time.time() + SECONDS)}
    got = {}
    th = threading.Thread(target=lambda: got.update(decode=_loop(dec, time.time() + SECONDS)))
    th.start()
    got["dit"] = _loop(dit, time.time() + SECONDS)
    th.join()
    r["two_threads_ms"] = got
    ctx, q = mp.get_context("spawn"), mp.get_context("spawn").Queue()
    until = time.time() + 30 + SECONDS  # both processes load the model first, then run together
    procs = [ctx.Process(target=_process, args=(w, until, q)) for w in ("dit", "decode")]
    for p in procs:
        p.start()
    r["two_processes_ms"] = dict(q.get() for _ in procs)
    for p in procs:
        p.join()
    zz = z[:, :1], z[:, 1:]
    r["decode_split_ms"] = {"first_frame": _loop(lambda: _decode(gen, zz[0]), time.time() + SECONDS),
                            "other_three": _loop(lambda: _decode(gen, zz[1]), time.time() + SECONDS),
                            "all_four": _loop(dec, time.time() + SECONDS)}
    text = json.dumps(r, indent=1)
    print(text)
    if len(sys.argv) > 1:
        open(sys.argv[1], "w").write(text + "\n")


if __name__ == "__main__":
    main()
