"""The live levels offline, on the live test's own audio: render it as `syncavatar render` does (the default
avatar, fp32, one thread) under each candidate, write the mp4 and score it as the live recordings are scored
(`syncavatar eval --video --audio --window 60`). The gap between a level here and a live recording at that
level is what the transport and the clock cost.

    .venv/bin/python docs/live/offline_levels.py runs/speech60.wav OUT.json CANDIDATE ...

CANDIDATE: `render` (the model's 20 steps, uncached) or SCHEDULE:guidance[+share] at the live 10 steps.
"""
import json
import sys
import tempfile
from pathlib import Path

import torch

from engine.audio import FPS, SAMPLE_RATE
from engine.caching import cache_config
from engine.config import DEFAULT_CONFIG, load_config
from engine.generator import load_avatar, render_frames
from engine.lipsync import evaluate
from engine.media import load_audio, write_mp4
from engine.model.avatar import load_model


def main(wav, out, cands):
    torch.set_num_threads(1)
    cfg = load_config(DEFAULT_CONFIG)
    model, audio = load_model(cfg.path(cfg.model.weights)), load_audio(wav, SAMPLE_RATE)
    avatar = load_avatar(cfg.engine.avatar)
    res = {}
    for c in cands:
        if c == "render":
            kw = {"steps": cfg.model.steps, "cache": None, "guidance": cfg.model.guidance}
        else:
            path, g = c.removesuffix("+share").split(":")
            kw = {"steps": cfg.live.steps, "guidance": float(g),
                  "cache": cache_config("synccache", cfg.live.steps, schedule=path, share_guidance=c.endswith("+share"))}
        frames, _ = render_frames(model, avatar, audio, seed=cfg.model.seed, noise_scale=cfg.model.noise_scale, **kw)
        with tempfile.TemporaryDirectory() as d:
            mp4 = Path(d) / "out.mp4"
            write_mp4(mp4, frames, FPS, audio, SAMPLE_RATE)
            e = evaluate(mp4, wav, window_s=60)
        res[c] = {"sync_conf": round(e["sync_conf"], 4), "offset_frames": e["offset_frames"]}
        print(c, res[c], flush=True)
    json.dump({"audio": wav, "candidates": res}, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
