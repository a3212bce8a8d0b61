"""A 60 s render for the model card: eye and mouth crops over time, and the picture's drift (issue 11).

    docs/live/make_speech.sh /tmp/speech60.wav 60
    .venv/bin/python docs/model/long_render.py /tmp/speech60.wav 1000 engine/weights/crops_60s.png engine/weights/long_render.json

Renders the speech (held-out voices and sentences with pauses) with avatar IDENT as `syncavatar render`
does (20 steps, uncached; `--cache synccache` as a 5th argument renders with the shipped schedule), then
draws the eye and mouth crops of the first, middle and last second and measures face_psnr over every
2nd frame, in 10 s windows: the drift is the last window's mean minus the first's. Its sync_conf is
what the live recording of the same speech is compared with (README, live results).
"""
import json
import sys

import numpy as np
import torch

from engine.caching import cache_config
from engine.generator import load_avatar, render_frames
from engine.lipsync import evaluate_arrays
from engine.media import load_audio
from engine.model.avatar import load_model
from engine.picture import crops_sheet, face_psnr

torch.set_num_threads(2)
speech, ident, sheet, out = sys.argv[1:5]
method = sys.argv[5] if len(sys.argv) > 5 else "none"
model = load_model()
audio = load_audio(speech, 16000)
cache = cache_config(method, 20, schedule="configs/synccache/ref-XS.json")
frames, stats = render_frames(model, load_avatar(ident), audio, cache=cache, progress=True)
fp = face_psnr(frames, ident, stride=2)
vals, idx = np.array(fp["psnr"]), np.array(fp["frames"])
windows = [float(vals[(idx >= s * 25) & (idx < (s + 10) * 25)].mean()) for s in range(0, int(len(frames) / 25) - 9, 10)]
first, last = float(vals[idx < 250].mean()), float(vals[idx >= len(frames) - 250].mean())
crops_sheet(frames, ident, sheet, title=f"avatar {ident}, {len(frames) / 25:.0f} s render ({method}): eyes and mouth")
lip = evaluate_arrays(frames, audio)
res = {"speech": speech, "avatar": ident, "cache": method, "frames": len(frames), "rtf": stats["rtf"],
       "sync_conf": lip["sync_conf"], "offset_frames": lip["offset_frames"],
       "face_psnr_median": fp["median"], "face_psnr_min": fp["min"], "first_10s": first, "last_10s": last,
       "drift_db": last - first, "windows_10s": windows, "sheet": sheet}
with open(out, "w") as f:
    json.dump(res, f, indent=1)
print(json.dumps(res))
