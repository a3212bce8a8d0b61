"""Two versions of RefDecoder side by side in one process, same weights: max difference of the frames and the
ms to decode a live chunk's 4 frames (fp32, one torch thread, alternating calls). Nothing else may run.

    git worktree add /tmp/old <commit>
    .venv/bin/python docs/model/decoder_ab.py /tmp/old/engine/model/autoencoder.py [rounds]
"""
import importlib.util
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


def main(old_path, rounds=30):
    spec = importlib.util.spec_from_file_location("old_autoencoder", old_path)
    old_ae = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old_ae)
    torch.set_num_threads(1)
    cfg = load_config(DEFAULT_CONFIG)
    m = load_model(cfg.path(cfg.model.weights))
    gen, audio, _ = _inputs(m, cfg, cfg.model.guidance)
    handle = attach(m.dit, cache_config("synccache", cfg.live.steps, schedule=cfg.path(cfg.live.levels[-1].schedule)))
    with torch.no_grad():
        z = _dit(handle, gen, audio, CHUNK_START)  # a live chunk's latents
        ae, new = m.ae, m.ae.decoder
        old = old_ae.RefDecoder(ae.cfg)
        old.load_state_dict(new.state_dict())
        old.eval()
        raw = z[0] * ae.latent_std[:, None, None] + ae.latent_mean[:, None, None]
        feats, image = gen.ref_feats
        a, b = old(raw, feats, image), new(raw, feats, image)
        print(f"max abs diff {(a - b).abs().max().item():.2e}; uint8 pixels that differ: "
              f"{int((ae.to_uint8(a) != ae.to_uint8(b)).sum())} of {a.numel()}")
        ms = {"old": [], "new": []}
        for r in range(rounds):
            for name, dec in ((("old", old), ("new", new)) if r % 2 else (("new", new), ("old", old))):
                t = time.perf_counter()
                dec(raw, feats, image)
                ms[name].append((time.perf_counter() - t) * 1000)
    mo, mn = np.median(ms["old"]), np.median(ms["new"])
    print(f"decode 4 frames, median of {rounds}: old {mo:.1f} ms, new {mn:.1f} ms, new/old {mn / mo:.3f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30)
