"""Audio features: log-mel spectrogram in torch (4 mel frames per 25 fps video frame) and loudness."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# The one home of the engine's audio and video clock: 16 kHz mono speech, 25 fps video, 640 samples a frame
SAMPLE_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640: the audio of one video frame (40 ms)
N_FFT = 400  # 25 ms window
HOP = 160  # 10 ms hop
N_MELS = 80
MEL_FRAMES_PER_VIDEO_FRAME = 4  # mel frames 4i..4i+3 belong to video frame i at 25 fps
mel_frames_per_video_frame = MEL_FRAMES_PER_VIDEO_FRAME


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    lin = f / (200.0 / 3)
    logstep = np.log(6.4) / 27.0
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / logstep, lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    """Inverse of the Slaney mel scale."""
    m = np.asarray(m, np.float64)
    logstep = np.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), m * (200.0 / 3))


def mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS,
                   fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """Slaney-normalised triangular mel filters, float32[n_mels, n_fft//2+1] (as librosa's default)."""
    fmax = sr / 2 if fmax is None else fmax
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)  # [K]
    hz = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))  # [M+2]
    fdiff = np.diff(hz)
    ramps = hz[:, None] - freqs[None, :]  # [M+2,K]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    fb = np.maximum(0, np.minimum(lower, upper))
    fb *= (2.0 / (hz[2:] - hz[:-2]))[:, None]  # equal-area (Slaney) normalisation
    return fb.astype(np.float32)


class LogMel(nn.Module):
    """Waveform float[..., S] at 16 kHz -> log(mel + 1e-5) float[..., 80, S//160 + 1]."""

    def __init__(self, sr: int = SAMPLE_RATE, n_fft: int = N_FFT, hop: int = HOP, n_mels: int = N_MELS):
        super().__init__()
        self.sr, self.n_fft, self.hop, self.n_mels = sr, n_fft, hop, n_mels
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("fb", torch.from_numpy(mel_filterbank(sr, n_fft, n_mels)), persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        shape = wav.shape[:-1]
        x = wav.reshape(-1, wav.shape[-1]).float()  # [B,S]
        pad = self.n_fft // 2
        mode = "reflect" if x.shape[-1] > pad else "constant"
        x = F.pad(x[:, None], (pad, pad), mode=mode)[:, 0]  # [B,S+n_fft]
        spec = torch.stft(x, self.n_fft, self.hop, window=self.window, center=False,
                          return_complex=True)  # [B,K,F]
        mel = self.fb @ spec.abs().pow(2)  # [B,80,F]
        return torch.log(mel + 1e-5).reshape(*shape, self.n_mels, mel.shape[-1])


def level_db(segment) -> float:
    """RMS level of a stretch of audio in dB (full scale = 0 dB; silence -100 dB)."""
    seg = np.asarray(segment, np.float64)
    return 20.0 * np.log10(float(np.sqrt(np.mean(seg ** 2))) + 1e-5) if seg.size else -100.0


def loudness_envelope(audio: np.ndarray, sr: int = SAMPLE_RATE, fps: float = 25,
                      n_frames: int | None = None) -> np.ndarray:
    """RMS level in dB of each video frame's audio span (1/fps s): float32[T], T = ceil(S*fps/sr)."""
    a = np.asarray(audio, np.float32).reshape(-1)
    hop = sr / fps
    T = int(np.ceil(len(a) / hop)) if n_frames is None else int(n_frames)
    out = np.empty(T, np.float32)
    for i in range(T):
        out[i] = level_db(a[int(round(i * hop)):int(round((i + 1) * hop))])
    return out
