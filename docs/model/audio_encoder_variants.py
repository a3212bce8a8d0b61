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

from engine.train import load_corpus
from engine.audio import LogMel
from engine.model.audio_encoder import audio_window, TOKENS_PER_FRAME
from engine.lipsync import pearson
torch.set_num_threads(2); torch.manual_seed(0)

class Enc(nn.Module):
    def __init__(self, norm="fixed", deep=False, dim=128):
        super().__init__()
        self.mel = LogMel(); self.normk = norm
        cin = 160 if norm == "both" else 80
        if deep:
            self.conv = nn.Sequential(
                nn.Conv1d(cin, dim, 5, padding=2), nn.SiLU(),
                nn.Conv1d(dim, dim, 3, stride=2, padding=1), nn.SiLU(),
                nn.Conv1d(dim, dim, 3, padding=1, dilation=1), nn.SiLU(),
                nn.Conv1d(dim, dim, 3, padding=2, dilation=2), nn.SiLU(),
                nn.Conv1d(dim, dim, 3, padding=4, dilation=4), nn.SiLU(),
                nn.Conv1d(dim, dim, 3, padding=1))
        else:
            self.conv = nn.Sequential(
                nn.Conv1d(cin, dim, 5, padding=2), nn.SiLU(),
                nn.Conv1d(dim, dim, 3, stride=2, padding=1), nn.SiLU(),
                nn.Conv1d(dim, dim, 3, padding=1), nn.SiLU(),
                nn.Conv1d(dim, dim, 3, padding=1))
        self.norm = nn.LayerNorm(dim); self.pos = nn.Parameter(torch.zeros(1, 64, dim))
        self.openness = nn.Linear(dim, 1)
    def forward(self, s, margin=1):
        m = self.mel(s)[..., :-1]
        fx = (m + 5.0) / 4.0
        if self.normk == "fixed": x = fx
        else:
            w = (m - m.mean(-1, keepdim=True)) / m.std((1, 2), keepdim=True).clamp_min(0.5)
            x = torch.cat([fx, w], 1) if self.normk == "both" else w
        h = self.conv(x).transpose(1, 2)
        cut = margin * TOKENS_PER_FRAME
        h = h[:, cut:h.shape[1] - cut]
        h = self.norm(h + self.pos[:, :h.shape[1]])
        b, n, d = h.shape
        return self.openness(h.reshape(b, n // 2, 2, d).mean(2)).squeeze(-1)

def run(name, enc, lookback=4, W=4, lookahead=2, steps=3000, clips=None, dev=None):
    A = lookback + W + lookahead
    opt = torch.optim.AdamW(enc.parameters(), 1e-3)
    rng = np.random.default_rng(0)
    auds = [torch.from_numpy(c["audio"].astype(np.float32)) for c in clips]
    t0 = time.time()
    for step in range(steps):
        xs, ys = [], []
        for _ in range(64):
            ci = int(rng.integers(len(clips))); T = len(clips[ci]["openness"])
            s = int(rng.integers(0, T))
            xs.append(audio_window(auds[ci], s - lookback, A))
            op = np.zeros(A, np.float32)
            for j in range(A):
                f = s - lookback + j
                if 0 <= f < T: op[j] = clips[ci]["openness"][f]
            ys.append(torch.from_numpy(op))
        for g in opt.param_groups: g["lr"] = 1e-3 * 0.5 * (1 + np.cos(np.pi * step / steps))
        loss = F.mse_loss(enc(torch.stack(xs)), torch.stack(ys))
        opt.zero_grad(); loss.backward(); opt.step()
    enc.eval(); rs = []
    with torch.no_grad():
        for c in dev:
            a = torch.from_numpy(c["audio"].astype(np.float32)); T = len(c["openness"])
            wins = torch.stack([audio_window(a, s - lookback, A) for s in range(0, T, W)])
            o = enc(wins)[:, lookback:lookback + W].reshape(-1)[:T].numpy()
            rs.append(pearson(o, c["openness"]))
    enc.train()
    print(f"{name}: dev r {np.mean(rs):.3f} (min {np.min(rs):.2f}) per-clip {[round(r,2) for r in rs]} loss {loss.item():.4f} {time.time()-t0:.0f}s", flush=True)

clips = load_corpus("data/corpus", keys=("audio", "openness"))
dev = load_corpus("data/dev", keys=("audio", "openness"))
for spec in sys.argv[1:]:
    norm, deep, la = spec.split("/")
    run(spec, Enc(norm, deep == "deep"), lookahead=int(la), clips=clips, dev=dev)
