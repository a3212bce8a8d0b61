"""Audio encoder variants, each trained alone on the openness target (3000 steps, batch 64, train corpus),
scored by Pearson r against the true openness on the dev split, chunk by chunk as the generator runs:

    .venv/bin/python docs/model/audio_encoder_variants.py fixed/shallow/2 both/shallow/2 both/deep/2 both/deep/4

A variant is NORM/DEPTH/LOOKAHEAD: NORM fixed (the old input scale) or both (fixed + normalised over the
window, as engine/model/audio_encoder.py now does); DEPTH shallow (4 convs, the old encoder) or deep (+2
dilated); LOOKAHEAD in video frames. Stop 9 (2 min each): 0.777, 0.809, 0.824, 0.814; both/shallow/4 0.820.
"""
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.audio import LogMel
from engine.lipsync import pearson
from engine.model.audio_encoder import TOKENS_PER_FRAME, audio_window
from engine.train import load_corpus

torch.set_num_threads(2)
torch.manual_seed(0)


class Variant(nn.Module):
    """The audio encoder's conv stack with another input scaling and depth, and its openness head."""

    def __init__(self, norm="fixed", deep=False, dim=128):
        super().__init__()
        self.mel, self.norm_kind = LogMel(), norm
        layers = [nn.Conv1d(160 if norm == "both" else 80, dim, 5, padding=2), nn.SiLU(),
                  nn.Conv1d(dim, dim, 3, stride=2, padding=1), nn.SiLU(),
                  nn.Conv1d(dim, dim, 3, padding=1), nn.SiLU()]
        if deep:
            layers += [nn.Conv1d(dim, dim, 3, padding=2, dilation=2), nn.SiLU(),
                       nn.Conv1d(dim, dim, 3, padding=4, dilation=4), nn.SiLU()]
        self.conv = nn.Sequential(*layers, nn.Conv1d(dim, dim, 3, padding=1))
        self.norm = nn.LayerNorm(dim)
        self.pos = nn.Parameter(torch.zeros(1, 64, dim))
        self.openness = nn.Linear(dim, 1)

    def forward(self, samples, margin=1):
        m = self.mel(samples)[..., :-1]
        x = (m + 5.0) / 4.0
        if self.norm_kind == "both":
            window = (m - m.mean(-1, keepdim=True)) / m.std((1, 2), keepdim=True).clamp_min(0.5)
            x = torch.cat([x, window], 1)
        h = self.conv(x).transpose(1, 2)
        cut = margin * TOKENS_PER_FRAME
        h = self.norm(h[:, cut:h.shape[1] - cut] + self.pos[:, :h.shape[1] - 2 * cut])
        b, n, d = h.shape
        return self.openness(h.reshape(b, n // 2, 2, d).mean(2)).squeeze(-1)  # [B, frames]


def openness_window(clip, start, length):
    """True openness of frames [start, start + length), zero outside the clip."""
    out = np.zeros(length, np.float32)
    lo, hi = max(start, 0), min(start + length, len(clip["openness"]))
    if hi > lo:
        out[lo - start:hi - start] = clip["openness"][lo:hi]
    return torch.from_numpy(out)


def run(name, enc, clips, dev, lookback=4, frames=4, lookahead=2, steps=3000, batch=64, lr=1e-3):
    span = lookback + frames + lookahead
    opt = torch.optim.AdamW(enc.parameters(), lr)
    rng = np.random.default_rng(0)
    audio = [torch.from_numpy(c["audio"].astype(np.float32)) for c in clips]
    t0 = time.time()
    for step in range(steps):
        xs, ys = [], []
        for _ in range(batch):
            ci = int(rng.integers(len(clips)))
            s = int(rng.integers(0, len(clips[ci]["openness"])))
            xs.append(audio_window(audio[ci], s - lookback, span))
            ys.append(openness_window(clips[ci], s - lookback, span))
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        loss = F.mse_loss(enc(torch.stack(xs)), torch.stack(ys))
        opt.zero_grad()
        loss.backward()
        opt.step()
    rs = []
    with torch.no_grad():
        for c in dev:  # chunk by chunk, as the generator windows the audio
            a, T = torch.from_numpy(c["audio"].astype(np.float32)), len(c["openness"])
            wins = torch.stack([audio_window(a, s - lookback, span) for s in range(0, T, frames)])
            rs.append(pearson(enc(wins)[:, lookback:lookback + frames].reshape(-1)[:T].numpy(), c["openness"]))
    print(f"{name}: dev r {np.mean(rs):.3f} (min {np.min(rs):.2f}), per clip {[round(r, 2) for r in rs]}, "
          f"train loss {loss.item():.4f}, {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    train_clips = load_corpus("data/corpus", keys=("audio", "openness"))
    dev_clips = load_corpus("data/dev", keys=("audio", "openness"))
    for spec in sys.argv[1:]:
        norm, depth, la = spec.split("/")
        run(spec, Variant(norm, depth == "deep"), train_clips, dev_clips, lookahead=int(la))
