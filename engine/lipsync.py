"""Lip-sync expert (1-D SyncNet): mouth crop -> openness, speech -> openness, and the sync metrics.

The metric helpers (`pearson`, `peak_corr`) use numpy only; torch is imported lazily so clients can
import them without the model stack.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from engine.audio import FPS, SAMPLE_RATE as SR
MOUTH_ROWS = (50, 102)  # mouth box in a 128x128 frame (the corpus keeps the mouth inside it)
MOUTH_COLS = (32, 96)
CONTEXT = 5  # audio head sees video frames i-5..i+5, i.e. mel frames 4i-20 .. 4i+23
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "lipsync_expert.safetensors"


# ---------------------------------------------------------------- metrics (numpy only)

def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equal-length tracks; 0.0 when either has no variance."""
    a = np.asarray(a, np.float64).reshape(-1)
    b = np.asarray(b, np.float64).reshape(-1)
    n = min(len(a), len(b))
    if n < 2:
        return 0.0
    a, b = a[:n] - a[:n].mean(), b[:n] - b[:n].mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    if not np.isfinite(den) or den < 1e-12:
        return 0.0
    return float((a * b).sum() / den)


def peak_corr(video_track: np.ndarray, ref_track: np.ndarray, max_lag: int = 10) -> tuple[float, int]:
    """Max Pearson over lags in [-max_lag, max_lag] -> (conf, offset); offset > 0 = video late.

    At lag L, video_track[t + L] is compared with ref_track[t] over the overlapping part.
    """
    v = np.asarray(video_track, np.float64).reshape(-1)
    r = np.asarray(ref_track, np.float64).reshape(-1)
    n = min(len(v), len(r))
    v, r = v[:n], r[:n]
    best, best_lag = 0.0, 0
    for lag in range(-max_lag, max_lag + 1):
        if n - abs(lag) < 3:
            continue
        c = pearson(v[lag:], r[:n - lag]) if lag >= 0 else pearson(v[:n + lag], r[-lag:])
        if c > best or (c == best and abs(lag) < abs(best_lag)):
            best, best_lag = c, lag
    return float(best), int(best_lag)


# ---------------------------------------------------------------- model

def _build_modules():
    """Define the torch modules (kept in a function so importing this file does not need torch)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from engine.audio import LogMel

    def conv_block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

    class MouthNet(nn.Module):
        """Mouth crop float[B,3,52,64] in [-1,1] -> openness float[B]."""

        def __init__(self, width: int = 32):
            super().__init__()
            w = width
            self.body = nn.Sequential(  # 52x64 -> 26x32 -> 13x16 -> 7x8 -> 4x4
                conv_block(3, w, 2), conv_block(w, 2 * w, 2), conv_block(2 * w, 2 * w, 2),
                conv_block(2 * w, 4 * w, 2))
            self.head = nn.Sequential(nn.Linear(8 * w, 64), nn.SiLU(), nn.Linear(64, 1))

        def forward(self, x):
            h = self.body(x)  # [B,4w,4,4]
            h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)  # [B,8w]
            return self.head(h)[:, 0]

    class SpeechNet(nn.Module):
        """Normalised log-mel float[B,80,4T] -> openness float[B,T], one output per video frame."""

        def __init__(self, width: int = 128):
            super().__init__()
            w = width
            self.mel_convs = nn.Sequential(  # mel rate, receptive field +-2 mel frames
                nn.Conv1d(80, w, 3, padding=1), nn.SiLU(), nn.Conv1d(w, w, 3, padding=1), nn.SiLU())
            self.down = nn.Conv1d(w, w, 4, stride=4)  # mel 4i..4i+3 -> video frame i
            self.frame_convs = nn.Sequential(  # video rate, receptive field i-5..i+5
                nn.SiLU(), nn.Conv1d(w, w, 5, padding=2), nn.SiLU(),
                nn.Conv1d(w, w, 5, padding=2), nn.SiLU(), nn.Conv1d(w, w, 3, padding=1), nn.SiLU(),
                nn.Conv1d(w, 1, 1))

        def forward(self, mel):
            h = self.down(self.mel_convs(mel))  # [B,w,T]
            return self.frame_convs(h)[:, 0]  # [B,T]

    class LipSyncExpert(nn.Module):
        """Both heads plus the log-mel front end."""

        def __init__(self, mouth_width: int = 32, speech_width: int = 128):
            super().__init__()
            self.config = {"mouth_width": mouth_width, "speech_width": speech_width}
            self.mouth = MouthNet(mouth_width)
            self.speech = SpeechNet(speech_width)
            self.logmel = LogMel()

        def mel_for(self, audio, T: int):
            """Audio float[B,S] 16 kHz -> per-utterance normalised log-mel float[B,80,4T]."""
            mel = self.logmel(audio)  # [B,80,F]
            mu = mel.mean(-1, keepdim=True)
            sd = mel.std(-1, keepdim=True).clamp_min(0.1)
            mel = (mel - mu) / sd
            n = 4 * T
            if mel.shape[-1] < n:  # zero (= utterance mean) padding at the end
                mel = F.pad(mel, (0, n - mel.shape[-1]))
            return mel[..., :n]

    return MouthNet, SpeechNet, LipSyncExpert


@lru_cache(maxsize=1)
def _modules():
    return _build_modules()


def __getattr__(name):
    """Lazily expose the torch classes MouthNet, SpeechNet, LipSyncExpert."""
    names = ("MouthNet", "SpeechNet", "LipSyncExpert")
    if name in names:
        return _modules()[names.index(name)]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def mouth_crops(frames: np.ndarray, dy: int = 0, dx: int = 0):
    """uint8[T,128,128,3] -> float tensor [T,3,52,64] in [-1,1] (mouth box shifted by dy,dx)."""
    import torch
    import torch.nn.functional as F
    x = torch.as_tensor(np.asarray(frames))
    if x.shape[1:3] != (128, 128):
        x = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(128, 128), mode="bilinear",
                          antialias=True, align_corners=False).round().clamp(0, 255).permute(0, 2, 3, 1)
    r0, r1 = MOUTH_ROWS[0] + dy, MOUTH_ROWS[1] + dy
    c0, c1 = MOUTH_COLS[0] + dx, MOUTH_COLS[1] + dx
    crop = x[:, r0:r1, c0:c1].permute(0, 3, 1, 2).float()  # [T,3,52,64]
    return crop / 127.5 - 1.0


def save_expert(model, path) -> None:
    """Save weights + config as safetensors."""
    from safetensors.torch import save_file
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"config": json.dumps(model.config)})


def load_expert(path=DEFAULT_WEIGHTS):
    """Load a trained expert from safetensors (eval mode)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"lip-sync expert weights not found: {path} (train them: syncavatar train --stage expert)")
    with safe_open(str(path), "pt") as f:
        config = json.loads((f.metadata() or {}).get("config", "{}"))
    model = _modules()[2](**config)
    model.load_state_dict(load_file(str(path)), strict=False)
    return model.eval()


@lru_cache(maxsize=4)
def _cached_expert(path: str):
    return load_expert(path)


def video_openness(frames: np.ndarray, expert=None, batch: int = 256) -> np.ndarray:
    """uint8[T,128,128,3] frames -> openness float32[T] from the visual head."""
    import torch
    expert = expert or _cached_expert(str(DEFAULT_WEIGHTS))
    out = []
    with torch.inference_mode():
        for i in range(0, len(frames), batch):
            out.append(expert.mouth(mouth_crops(frames[i:i + batch])))
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros(0, np.float32)


def audio_openness(audio: np.ndarray, T: int, expert=None) -> np.ndarray:
    """float32[S] 16 kHz audio -> openness float32[T] implied by the speech (audio head)."""
    import torch
    expert = expert or _cached_expert(str(DEFAULT_WEIGHTS))
    a = torch.as_tensor(np.asarray(audio, np.float32).reshape(1, -1))
    with torch.inference_mode():
        return expert.speech(expert.mel_for(a, T))[0].numpy().astype(np.float32)


# ---------------------------------------------------------------- evaluation

def load_truth(path) -> np.ndarray:
    """Ground-truth openness float32[T] from a corpus .npz (key openness), a .npy or a .json list."""
    from engine.media import MediaError
    p = Path(path)
    if not p.exists():
        raise MediaError(f"truth file not found: {p}")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                return np.asarray(z["openness"], np.float32).reshape(-1)
        if p.suffix == ".npy":
            return np.asarray(np.load(p, allow_pickle=False), np.float32).reshape(-1)
        if p.suffix == ".json":
            return np.asarray(json.loads(p.read_text()), np.float32).reshape(-1)
    except (OSError, ValueError, KeyError) as e:
        raise MediaError(f"cannot read truth file ({e}): {p}") from None
    raise MediaError(f"truth file must be .npz, .npy or .json: {p}")


def evaluate_arrays(frames: np.ndarray, audio: np.ndarray, truth: np.ndarray | None = None,
                    expert=None, fps: float = FPS) -> dict:
    """Lip-sync metrics for uint8[T,128,128,3] frames with float32[S] 16 kHz audio (and truth[T])."""
    from engine.audio import loudness_envelope
    T = len(frames)
    vid = video_openness(frames, expert)
    aud = audio_openness(audio, T, expert)
    conf, off = peak_corr(vid, aud)
    env_conf, _ = peak_corr(vid, loudness_envelope(audio, SR, fps, n_frames=T))
    res = {"sync_conf": conf, "offset_frames": off, "env_corr": env_conf,
           "frames": int(T), "audio_s": float(len(audio)) / SR}
    if truth is not None:
        res["gt_corr"] = pearson(vid, np.asarray(truth, np.float32)[:T])
    return res


def evaluate_windows(frames: np.ndarray, audio: np.ndarray, window_s: float, expert=None, fps: float = FPS) -> list:
    """evaluate_arrays on consecutive windows of window_s seconds (e.g. the minutes of a long session):
    a drift between sound and picture shows up as offset_frames changing from window to window."""
    n = max(1, int(round(window_s * fps)))
    out = []
    for a in range(0, len(frames), n):
        f = frames[a:a + n]
        seg = audio[int(a / fps * SR):int((a + len(f)) / fps * SR)]
        if len(f) >= n // 2 and len(seg):
            out.append({"start_s": round(a / fps, 2)} | evaluate_arrays(f, seg, expert=expert, fps=fps))
    return out


def evaluate(video_path, audio_path=None, truth_path=None, expert=None, window_s=None) -> dict:
    """Lip-sync metrics of a video file, with its own audio track or a separate audio file; window_s adds
    "windows": the same metrics per window of that many seconds."""
    from engine.media import MediaError, load_audio, read_mp4
    frames, own_audio, fps = read_mp4(video_path)
    if audio_path is not None:
        audio = load_audio(audio_path, SR)
    elif own_audio is None:
        raise MediaError(f"video has no audio track and no audio file was given: {video_path}")
    else:
        audio = own_audio
    truth = load_truth(truth_path) if truth_path is not None else None
    res = evaluate_arrays(frames, audio, truth, expert, fps)
    if window_s:
        res["windows"] = evaluate_windows(frames, audio, window_s, expert, fps)
    return res
