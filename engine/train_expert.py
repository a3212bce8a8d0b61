"""Train the lip-sync expert's two heads on corpus ground-truth openness (CPU, minutes)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.lipsync import (CONTEXT, MOUTH_COLS, MOUTH_ROWS, LipSyncExpert, audio_openness, pearson,
                            peak_corr, save_expert)

SHIFT = 3  # max random crop shift of the mouth box, px
R0, R1 = MOUTH_ROWS[0] - SHIFT, MOUTH_ROWS[1] + SHIFT
C0, C1 = MOUTH_COLS[0] - SHIFT, MOUTH_COLS[1] + SHIFT


def load_clips(corpus_dir, keep_frames: bool = False) -> list[dict]:
    """Load clip_*.npz: mouth region (+-SHIFT margin) uint8[T,58,70,3], audio, audio_clean, openness."""
    paths = sorted(Path(corpus_dir).glob("clip_*.npz"))
    if not paths:
        raise FileNotFoundError(f"no clip_*.npz files in {corpus_dir}")
    clips = []
    for p in tqdm(paths, desc=f"load {Path(corpus_dir).name}", leave=False):
        with np.load(p, allow_pickle=False) as z:
            frames = z["frames"]
            c = {"name": p.stem, "mouth": np.ascontiguousarray(frames[:, R0:R1, C0:C1]),
                 "audio": z["audio"].astype(np.float32), "openness": z["openness"].astype(np.float32)}
            c["audio_clean"] = z["audio_clean"].astype(np.float32) if "audio_clean" in z else c["audio"]
            if keep_frames:
                c["frames"] = frames
        clips.append(c)
    return clips


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian blur: x [B,3,H,W], sigma [B] (0 = none)."""
    B, C, H, W = x.shape
    r = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-r[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))  # [B,5]
    k = k / k.sum(1, keepdim=True)
    k2 = (k[:, :, None] * k[:, None, :]).repeat_interleave(C, 0)[:, None]  # [B*C,1,5,5]
    y = F.conv2d(F.pad(x.reshape(1, B * C, H, W), (2, 2, 2, 2), mode="replicate"), k2, groups=B * C)
    return y.reshape(B, C, H, W)


def visual_batch(clips, rng: np.random.Generator, batch: int, augment: bool = True):
    """Random frames -> (crops float[B,3,52,64] in [-1,1], openness float[B])."""
    ci = rng.integers(len(clips), size=batch)
    h, w = MOUTH_ROWS[1] - MOUTH_ROWS[0], MOUTH_COLS[1] - MOUTH_COLS[0]
    xs, ys = [], []
    for c in ci:
        t = rng.integers(len(clips[c]["openness"]))
        dy, dx = rng.integers(0, 2 * SHIFT + 1, size=2) if augment else (SHIFT, SHIFT)
        xs.append(clips[c]["mouth"][t, dy:dy + h, dx:dx + w])
        ys.append(clips[c]["openness"][t])
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [B,3,52,64]
    if augment:
        B = x.shape[0]
        sigma = torch.where(torch.rand(B) < 0.6, 0.3 + 1.2 * torch.rand(B), torch.zeros(B))
        x = torch.where(sigma[:, None, None, None] > 0, _blur(x, sigma), x)
        mean = x.mean((1, 2, 3), keepdim=True)
        contrast = 0.7 + 0.6 * torch.rand(B, 1, 1, 1)
        bright = 0.3 * (torch.rand(B, 1, 1, 1) - 0.5) + 0.1 * (torch.rand(B, 3, 1, 1) - 0.5)
        x = (x - mean) * contrast + mean + bright
        x = x + 0.03 * torch.rand(B, 1, 1, 1) * torch.randn_like(x)
        x = x.clamp(-1, 1)
    return x, torch.from_numpy(np.array(ys, np.float32))


def audio_batch(clips, rng: np.random.Generator, batch: int, model, length: int = 80):
    """Random clip windows -> (normalised mel [B,80,4(L+2C)], openness [B,L], mask [B,L])."""
    m = CONTEXT + 1
    mels, ys, masks = [], [], []
    for c in rng.integers(len(clips), size=batch):
        clip = clips[c]
        T = len(clip["openness"])
        a = clip["audio"] if rng.random() < 0.6 else clip["audio_clean"]
        a = a * np.float32(10 ** (rng.uniform(-20, 6) / 20))
        mel = model.mel_for(torch.from_numpy(a)[None], T)[0]  # [80,4T]
        s = int(rng.integers(-length // 4, max(T - length + length // 4, 1)))
        lo, hi = s - m, s + length + m  # window in video frames, zero padded outside the clip
        P = 4 * (length + 2 * m)
        mel_w = F.pad(mel, (P, P))[:, P + 4 * lo:P + 4 * hi]  # [80,4(L+2m)]
        y = np.zeros(length, np.float32)
        k = np.zeros(length, np.float32)
        idx = np.arange(s, s + length)
        ok = (idx >= 0) & (idx < T)
        y[ok], k[ok] = clip["openness"][idx[ok]], 1.0
        mels.append(mel_w)
        ys.append(y)
        masks.append(k)
    return torch.stack(mels), torch.from_numpy(np.stack(ys)), torch.from_numpy(np.stack(masks))


@torch.no_grad()
def validate(model, clips) -> dict:
    """Held-out metrics: per-frame Pearson of each head vs truth, and sync_conf on true frames."""
    model.eval()
    vid, aud, aud_clean, gt, confs, offs, gts = [], [], [], [], [], [], []
    h, w = MOUTH_ROWS[1] - MOUTH_ROWS[0], MOUTH_COLS[1] - MOUTH_COLS[0]
    for c in clips:
        T = len(c["openness"])
        crop = c["mouth"][:, SHIFT:SHIFT + h, SHIFT:SHIFT + w]
        x = torch.from_numpy(crop).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        v = torch.cat([model.mouth(x[i:i + 256]) for i in range(0, T, 256)]).numpy()
        a = audio_openness(c["audio"], T, model)
        ac = audio_openness(c["audio_clean"], T, model)
        conf, off = peak_corr(v, a)
        vid.append(v), aud.append(a), aud_clean.append(ac), gt.append(c["openness"])
        confs.append(conf), offs.append(off), gts.append(pearson(v, c["openness"]))
    model.train()
    cat = np.concatenate
    return {"clips": len(clips), "frames": int(sum(len(g) for g in gt)),
            "visual_pearson": pearson(cat(vid), cat(gt)),
            "audio_pearson": pearson(cat(aud), cat(gt)),
            "audio_clean_pearson": pearson(cat(aud_clean), cat(gt)),
            "gt_corr_mean": float(np.mean(gts)), "gt_corr_min": float(np.min(gts)),
            "sync_conf_mean": float(np.mean(confs)), "sync_conf_min": float(np.min(confs)),
            "sync_conf_median": float(np.median(confs)),
            "offset_abs_mean": float(np.mean(np.abs(offs))), "offset_zero_frac": float(np.mean(np.array(offs) == 0))}


def train_expert(corpus_dir, out_path, steps: int = 4000, batch: int = 64, seed: int = 0,
                 val_dir=None, time_limit_s: float = 450.0, lr: float = 2e-3, audio_batch_size: int = 16,
                 log_every: int = 100, threads: int = 2) -> dict:
    """Train both heads (one visual + one audio Adam step per iteration) and save safetensors + json."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    clips = load_clips(corpus_dir)
    val = load_clips(val_dir) if val_dir else None
    model = LipSyncExpert().train()
    opt_v = torch.optim.Adam(model.mouth.parameters(), lr=lr)
    opt_a = torch.optim.Adam(model.speech.parameters(), lr=lr)
    tstart = time.time()
    ema_v = ema_a = None
    log = []
    pbar = tqdm(range(steps), desc="expert", mininterval=2)
    step = 0
    for step in pbar:
        frac = max(step / steps, (time.time() - tstart) / time_limit_s)
        if frac >= 1:
            break
        cur = lr * (min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * frac)) + 0.02)
        for g in opt_v.param_groups + opt_a.param_groups:
            g["lr"] = cur
        x, y = visual_batch(clips, rng, batch)
        loss_v = F.mse_loss(model.mouth(x), y)
        opt_v.zero_grad(set_to_none=True)
        loss_v.backward()
        opt_v.step()
        mel, ya, mask = audio_batch(clips, rng, audio_batch_size, model)
        m = CONTEXT + 1
        pred = model.speech(mel)[:, m:-m]  # [B,L]
        loss_a = ((pred - ya) ** 2 * mask).sum() / mask.sum().clamp_min(1)
        opt_a.zero_grad(set_to_none=True)
        loss_a.backward()
        opt_a.step()
        ema_v = loss_v.item() if ema_v is None else 0.95 * ema_v + 0.05 * loss_v.item()
        ema_a = loss_a.item() if ema_a is None else 0.95 * ema_a + 0.05 * loss_a.item()
        pbar.set_postfix(v=f"{ema_v:.4f}", a=f"{ema_a:.4f}", lr=f"{cur:.1e}")
        if step % log_every == 0:
            log.append({"step": step, "t": round(time.time() - tstart, 1), "loss_visual": ema_v,
                        "loss_audio": ema_a, "lr": cur})
            tqdm.write(json.dumps(log[-1]))
    pbar.close()
    model.eval()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_expert(model, out_path)
    metrics = {"steps": step, "train_s": round(time.time() - tstart, 1), "total_s": None,
               "train_clips": len(clips), "loss_visual": ema_v, "loss_audio": ema_a, "log": log}
    if val:
        metrics["val"] = validate(model, val)
        tqdm.write("val " + json.dumps(metrics["val"]))
    metrics["total_s"] = round(time.time() - t0, 1)
    out_path.with_suffix(".json").write_text(json.dumps(metrics, indent=1))
    return metrics

