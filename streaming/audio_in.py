"""Microphone audio in: any rate / channel count -> 16 kHz mono float, a bounded buffer, and VAD flags.

The buffer is indexed by absolute sample number since the session started (16 kHz), so the chunker can ask
for any window by frame number; old audio is dropped once no chunk can need it. webrtcvad classifies
every 20 ms (320 samples) as it arrives; a video frame (40 ms) counts as speech when either half does.
"""
from __future__ import annotations

import av
import numpy as np
import webrtcvad

from engine.audio import SAMPLE_RATE

VAD_SAMPLES = 320  # 20 ms


class AudioInput:
    """Resample, buffer and VAD-gate pushed PCM. Not thread-safe: push and read from one thread."""

    def __init__(self, vad_mode: int = 3, keep_s: float = 4.0):
        if vad_mode not in (0, 1, 2, 3):
            raise ValueError(f"vad_mode must be 0..3, got {vad_mode}")
        self.vad = webrtcvad.Vad(vad_mode)
        self.keep = int(keep_s * SAMPLE_RATE)
        self.buf = np.zeros(0, np.float32)
        self.base = 0  # absolute sample index of buf[0]
        self.speech = bytearray()  # one flag per 20 ms VAD frame, absolute index
        self.speech_base = 0
        self._resampler = None
        self._rate = None
        self.gap_samples = 0  # silence inserted for network gaps

    @property
    def end(self) -> int:
        """Absolute index one past the last buffered sample."""
        return self.base + len(self.buf)

    def push(self, pcm, sample_rate: int) -> int:
        """Append PCM: int16 or float32 (-1..1), shape [n] (mono) or [n, channels]. -> samples added (16 kHz)."""
        pcm = np.asarray(pcm)
        if pcm.ndim == 1:
            pcm = pcm[:, None]
        if pcm.ndim != 2 or pcm.shape[1] not in (1, 2):
            raise ValueError(f"pcm must be [n] or [n, 1|2] samples, got shape {pcm.shape}")
        if pcm.dtype == np.int16:
            pcm = pcm.astype(np.float32) / 32768
        elif pcm.dtype in (np.float32, np.float64):
            # a float mic is -1..1: NaN/inf (a broken driver) become silence, beyond full scale is clipped
            pcm = np.clip(np.nan_to_num(pcm.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0), -1.0, 1.0)
        else:
            raise ValueError(f"pcm must be int16 or float, got {pcm.dtype}")
        if not isinstance(sample_rate, (int, np.integer)) or not 8000 <= sample_rate <= 192000:
            raise ValueError(f"sample_rate must be an integer in 8000..192000, got {sample_rate!r}")
        if len(pcm) == 0:
            return 0
        # stereo -> mono as the mean of the channels: full scale stays full scale (FFmpeg's downmix adds
        # them at -3 dB each, which takes two full-scale channels to 1.41)
        mono_in = np.ascontiguousarray(pcm.mean(axis=1, dtype=np.float32))
        if self._rate != sample_rate:
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            self._rate = sample_rate
        frame = av.AudioFrame.from_ndarray(mono_in[None], format="flt", layout="mono")
        frame.sample_rate = sample_rate
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        mono = np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)
        np.clip(mono, -1.0, 1.0, out=mono)  # the resampler rings past full scale on clipped input
        self._append(mono)
        return len(mono)

    def pad_silence(self, n: int) -> None:
        """Insert n samples of silence (a network gap), so the buffer keeps pace with the session clock."""
        if n > 0:
            self.gap_samples += n
            self._append(np.zeros(n, np.float32))

    def _append(self, mono: np.ndarray) -> None:
        self.buf = np.concatenate([self.buf, mono])
        # VAD every complete 20 ms frame not yet classified
        while (len(self.speech) + self.speech_base + 1) * VAD_SAMPLES <= self.end:
            a = (len(self.speech) + self.speech_base) * VAD_SAMPLES - self.base
            seg = np.clip(self.buf[a:a + VAD_SAMPLES] * 32767, -32768, 32767).astype(np.int16)
            self.speech.append(1 if self.vad.is_speech(seg.tobytes(), SAMPLE_RATE) else 0)

    def window(self, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) (absolute), zeros where before the session or not buffered."""
        out = np.zeros(stop - start, np.float32)
        lo, hi = max(start, self.base), min(stop, self.end)
        if hi > lo:
            out[lo - start:hi - start] = self.buf[lo - self.base:hi - self.base]
        return out

    def speech_frames(self, first: int, count: int) -> np.ndarray:
        """VAD flag per video frame [first, first + count) (bool), False where unknown."""
        out = np.zeros(count, bool)
        for k in range(count):
            for v in (2 * (first + k), 2 * (first + k) + 1):
                j = v - self.speech_base
                if 0 <= j < len(self.speech) and self.speech[j]:
                    out[k] = True
        return out

    def trim(self, keep_from: int) -> None:
        """Forget audio before absolute sample keep_from (never more than needed: keeps keep_s at least)."""
        cut = min(keep_from, self.end - self.keep) - self.base
        if cut > 0:
            self.buf = self.buf[cut:]
            self.base += cut
        vcut = self.base // VAD_SAMPLES - self.speech_base
        if vcut > 0:
            del self.speech[:vcut]
            self.speech_base += vcut
