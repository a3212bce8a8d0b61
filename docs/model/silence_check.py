"""Silence: 8 s of all-zero audio rendered for avatar 3 at the defaults; the expert's mouth openness and how far
the eye band drifts from the reference portrait (mean abs difference, 0-255), plus a 16-frame strip.

    .venv/bin/python docs/model/silence_check.py silence_strip.png

Stop 9 (shipped model): openness mean 0.141, max 0.305; eye band 1.7 / 18.2 / 21.7 (min / median / max).
"""
import sys

import matplotlib
import numpy as np

from engine.generator import load_avatar, render_frames
from engine.lipsync import video_openness
from engine.model.avatar import load_model

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

model = load_model()
avatar = load_avatar("3")
frames, _ = render_frames(model, avatar, np.zeros(16000 * 8, np.float32))
openness = video_openness(frames)
band = (slice(40, 62), slice(30, 98))
eye = np.abs(frames[:, band[0], band[1]].astype(float) - avatar.rgb[band].astype(float)).mean((1, 2, 3))
print(f"openness mean {openness.mean():.3f} max {openness.max():.3f} std {openness.std():.3f}")
print(f"eye-band diff vs reference: min {eye.min():.1f} median {np.median(eye):.1f} max {eye.max():.1f}")
idx = np.linspace(0, len(frames) - 1, 16).astype(int)
rows = [np.concatenate(list(frames[idx[:8]]), 1), np.concatenate(list(frames[idx[8:]]), 1)]
plt.imsave(sys.argv[1] if len(sys.argv) > 1 else "silence_strip.png", np.concatenate(rows, 0))
