"""A live chunk (10 steps, the live SyncCache schedule, bf16, one thread, as the worker runs it) with two
weight files side by side in one process, alternating, median of the rounds after the first: what a
decoder change costs the live engine, free of this machine's drift.

    .venv/bin/python docs/model/live_chunk_ab.py engine/weights/avatar.safetensors runs/dec5/avatar.safetensors 11
"""
import sys
import time

import numpy as np
import torch

torch.set_num_threads(1)
from engine.model.avatar import load_model
from engine.config import load_config, DEFAULT_CONFIG
from engine.bench_audio import _inputs, CHUNK_START
from engine.caching import attach, cache_config
cfg = load_config(DEFAULT_CONFIG)
models = {k: load_model(p) for k, p in zip(("A", "B"), sys.argv[1:3])}
live = cache_config("synccache", 10, schedule=cfg.path(cfg.live.levels[0].schedule))
gens = {k: _inputs(m, cfg, 3.0) for k, m in models.items()}
ms = {k: [] for k in models}
for r in range(int(sys.argv[3]) if len(sys.argv) > 3 else 9):
    for k, m in models.items():
        gen, audio, _ = gens[k]; h = attach(m.dit, live); gen.reset()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            t = time.perf_counter(); gen.chunk(audio, CHUNK_START); dt = time.perf_counter() - t
        h.remove()
        if r: ms[k].append(dt * 1000)
print({k: round(float(np.median(v)), 1) for k, v in ms.items()})
