"""What shared guidance costs: the DiT stage of one live chunk (10 steps, fp32, one torch thread) under each
live plan with guidance off, with guidance 3, and with guidance 3 sharing the heavy blocks between the
pair's halves (SyncCacheConfig.share_guidance), called in turn round after round. Nothing else may run.

    .venv/bin/python docs/live/share_guidance_ab.py [rounds] [out.json]
"""
import json
import sys
import time

import numpy as np
import torch

sys.path.insert(0, "docs/live")
from stage_times import _dit  # noqa: E402

from engine.bench_audio import CHUNK_START, _inputs  # noqa: E402
from engine.caching import attach, cache_config  # noqa: E402
from engine.config import DEFAULT_CONFIG, load_config  # noqa: E402
from engine.model.avatar import load_model  # noqa: E402

PLANS = ("gentle", "boost", "max")
VARIANTS = {"guidance 1": (1.0, False), "guidance 3": (3.0, False), "guidance 3 shared": (3.0, True)}


def main(rounds=8, out=None):
    torch.set_num_threads(1)
    cfg = load_config(DEFAULT_CONFIG)
    m = load_model(cfg.path(cfg.model.weights))
    inputs = {g: _inputs(m, cfg, g)[:2] for g in (1.0, 3.0)}
    ms = {(p, v): [] for p in PLANS for v in VARIANTS}
    with torch.no_grad():
        for r in range(rounds + 1):  # round 0 warms up
            for key in (list(ms) if r % 2 else list(ms)[::-1]):
                plan, (g, share) = key[0], VARIANTS[key[1]]
                handle = attach(m.dit, cache_config("synccache", cfg.live.steps, share_guidance=share,
                                                    schedule=cfg.path(f"configs/synccache/ref-XS-10-{plan}.json")))
                gen, audio = inputs[g]
                t = time.perf_counter()
                _dit(handle, gen, audio, CHUNK_START)
                if r:
                    ms[key].append((time.perf_counter() - t) * 1000)
                handle.remove()
    res = {"rounds": rounds, "dit_ms_median": {p: {v: round(float(np.median(ms[(p, v)])), 1) for v in VARIANTS}
                                               for p in PLANS}}
    print(json.dumps(res, indent=1))
    if out:
        json.dump(res, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8, sys.argv[2] if len(sys.argv) > 2 else None)
