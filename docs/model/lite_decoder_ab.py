"""The model's decoder and a second decoder file of its latents (the lite one) side by side in one process:
ms to decode a live chunk's first frame and all 4 frames (fp32, one torch thread, alternating calls), and how
far apart their frames are. Nothing else may run.

    .venv/bin/python docs/model/lite_decoder_ab.py engine/weights/decoder-lite.safetensors [rounds] [out.json]
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
from engine.model.avatar import load_decoder, load_model  # noqa: E402
from engine.picture import psnr  # noqa: E402


def main(path, rounds=30, out=None):
    torch.set_num_threads(1)
    cfg = load_config(DEFAULT_CONFIG)
    m = load_model(cfg.path(cfg.model.weights))
    decoders = {"model": m.ae, "lite": load_decoder(path, m)}
    gen, audio, _ = _inputs(m, cfg, cfg.model.guidance)
    handle = attach(m.dit, cache_config("synccache", cfg.live.steps, schedule=cfg.path(cfg.live.levels[2].schedule)))
    with torch.no_grad():
        z = _dit(handle, gen, audio, CHUNK_START)[0]  # a live chunk's latents [4, C, h, w]
        feats = {k: gen.features(ae) for k, ae in decoders.items()}
        frames = {k: ae.to_uint8(ae.decode(z, feats[k])) for k, ae in decoders.items()}
        ms = {f"{k} {n}": [] for k in decoders for n in ("first", "all")}
        for r in range(rounds):
            for k in (list(decoders) if r % 2 else list(decoders)[::-1]):
                for n, zz in (("first", z[:1]), ("all", z)):
                    t = time.perf_counter()
                    decoders[k].decode(zz, feats[k])
                    ms[f"{k} {n}"].append((time.perf_counter() - t) * 1000)
    res = {"decoder": path, "rounds": rounds, "median_ms": {k: round(float(np.median(v)), 1) for k, v in ms.items()},
           "lite_over_model_all": round(float(np.median(ms["lite all"]) / np.median(ms["model all"])), 3),
           "frames_psnr_db": round(float(psnr(frames["lite"], frames["model"])), 1)}
    print(json.dumps(res, indent=1))
    if out:
        json.dump(res, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30, sys.argv[3] if len(sys.argv) > 3 else None)
