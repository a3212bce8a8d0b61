"""Which 10-step schedule the live engine runs (issue 11): candidates rendered on the dev split (never the
test clips) at the live engine's 10 steps, scored by lip sync and the picture.

    .venv/bin/python docs/live/live_schedule_check.py data/dev 8 docs/live/live_schedule_check.json \
        configs/synccache/ref-XS-10.json:1 configs/synccache/ref-XS-10.json:0 OLD.json:0

Each candidate is SCHEDULE:forecast[:guidance[:decode_every[:decoder]]][+share] (guidance: the model's 3.0 unless given;
1.0 = off, half the DiT batch; +share: the heavy blocks run once for both halves of a guided step, as a
[[live.levels]] table with share_guidance = true; decode_every k: frames 0, k, 2k, ... of each chunk shown k times each, as a
[[live.levels]] table with decode_every = k shows them; decoder: a second decoder's file, e.g.
engine/weights/decoder-lite.safetensors, as the table's `decoder`). Frames decode in fp32 (the worker's bf16
changes frames by 59-64 dB PSNR); no timing here (reuse counts set the speed). STEPS=20 in the environment
renders at 20 steps instead (candidates' schedules must be solved for that many).
"""
import json
import os
import sys

import numpy as np
import torch

from engine.generator import Avatar, render_frames
from engine.lipsync import evaluate_arrays
from engine.model.avatar import load_decoder, load_model
from engine.picture import face_psnr
from engine.bench import load_clips
from synccache import Schedule, SyncCacheConfig

torch.set_num_threads(1)
STEPS = int(os.environ.get("STEPS", 10))  # the live engine's
corpus, n, out, cands = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
model = load_model()
decoders = {}
rows = {c: [] for c in ["uncached"] + cands}
for clip in load_clips(corpus, n):
    ident = json.loads(str(clip["meta"]))["identity"]
    avatar = Avatar("dev", clip["ref"], clip["ref_person_mask"].astype(bool), clip["ref_face_mask"].astype(bool))
    for c in rows:
        cache, guidance, every, decoder = None, 3.0, 1, None
        if c != "uncached":
            path, fc, *g = c.removesuffix("+share").split(":")
            cache = SyncCacheConfig(schedule=Schedule.load(path), forecast=int(fc), share_guidance=c.endswith("+share"))
            guidance = float(g[0]) if g else guidance
            every = int(g[1]) if len(g) > 1 else every
            decoder = decoders.setdefault(g[2], load_decoder(g[2], model)) if len(g) > 2 and g[2] else None
        frames, _ = render_frames(model, avatar, clip["audio"], steps=STEPS, cache=cache, guidance=guidance,
                                  decoder=decoder)
        i = np.arange(len(frames))
        frames = frames[i - i % every]  # chunks start at multiples of 4 frames, which every divides
        lip = evaluate_arrays(frames, clip["audio"], clip["openness"][:len(frames)])
        rows[c].append({"sync_conf": lip["sync_conf"], "gt_corr": lip["gt_corr"], "offset": lip["offset_frames"],
                        "face_psnr": face_psnr(frames, ident, 4)["median"]})
summary = {c: {k: float(np.mean([r[k] for r in v])) for k in ("sync_conf", "gt_corr", "face_psnr")}
           | {"max_abs_offset": int(max(abs(r["offset"]) for r in v))} for c, v in rows.items()}
json.dump({"corpus": corpus, "clips": n, "summary": summary, "per_clip": rows}, open(out, "w"), indent=1)
print(json.dumps(summary, indent=1))
