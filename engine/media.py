"""Audio/video file I/O with PyAV: decode any audio to 16 kHz mono, write/read H.264+AAC mp4."""
from __future__ import annotations

import os
import wave
from fractions import Fraction

import av
import numpy as np

AAC_RATE = 48000  # rate the AAC track is written at


class MediaError(Exception):
    """A media file the user gave cannot be used; the message is one line."""


def _open(path) -> av.container.InputContainer:
    """Open a media file for reading or raise MediaError."""
    path = str(path)
    if not os.path.exists(path):
        raise MediaError(f"file not found: {path}")
    if os.path.isdir(path):
        raise MediaError(f"is a directory, not a media file: {path}")
    try:
        return av.open(path)
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise MediaError(f"cannot read media file ({_reason(e)}): {path}") from None


def _reason(e: Exception) -> str:
    """Short one-line reason from a PyAV/OS error."""
    msg = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return msg.splitlines()[0].strip()


def _decode_audio(container, path, sr: int) -> np.ndarray:
    """Decode the first audio stream of an open container to float32 mono at sr."""
    if not container.streams.audio:
        raise MediaError(f"no audio stream: {path}")
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
    chunks = []
    try:
        for frame in container.decode(stream):
            frame.pts = None  # let the resampler count samples itself
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    except (av.error.FFmpegError, ValueError) as e:
        raise MediaError(f"corrupt audio ({_reason(e)}): {path}") from None
    audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if audio.size == 0:
        raise MediaError(f"audio has no samples: {path}")
    return audio


def load_audio(path, sr: int = 16000) -> np.ndarray:
    """Decode any audio/video file's first audio track to float32[S] mono at sr."""
    with _open(path) as container:
        return _decode_audio(container, str(path), sr)


def save_wav(path, audio: np.ndarray, sr: int = 16000) -> None:
    """Write float32[S] (or [S,C]) audio in [-1,1] as a 16-bit PCM wav."""
    a = np.asarray(audio, np.float32)
    a = a[:, None] if a.ndim == 1 else a  # [S,C]
    pcm = (np.clip(a, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(a.shape[1])
        w.setsampwidth(2)
        w.setframerate(int(sr))
        w.writeframes(pcm.tobytes())


def write_mp4(path, frames: np.ndarray, fps: float = 25, audio: np.ndarray | None = None,
              sr: int = 16000, crf: int = 18) -> None:
    """Write uint8[T,H,W,3] frames as H.264 (+ optional float32[S] mono audio as AAC), both from t=0."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be uint8[T,H,W,3] with T>0, got {frames.shape}")
    frames = frames.astype(np.uint8, copy=False)
    T, H, W, _ = frames.shape
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=rate)
        vs.width, vs.height, vs.pix_fmt = W + W % 2, H + H % 2, "yuv420p"
        vs.options = {"crf": str(crf), "preset": "veryfast"}
        as_ = None
        if audio is not None:
            as_ = out.add_stream("aac", rate=AAC_RATE, layout="mono")
            as_.time_base = Fraction(1, AAC_RATE)
        # video: frame i shown at t = i / fps
        for i, img in enumerate(frames):
            if (H % 2) or (W % 2):
                img = np.pad(img, ((0, H % 2), (0, W % 2), (0, 0)), mode="edge")
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            vf.pts = i  # encoder time base is 1/fps
            out.mux(vs.encode(vf))
        out.mux(vs.encode(None))
        if as_ is not None:
            _encode_audio(out, as_, np.asarray(audio, np.float32).reshape(-1), sr)


def _encode_audio(out, stream, audio: np.ndarray, sr: int) -> None:
    """Resample float32[S] mono to the AAC rate and encode in encoder-sized frames from pts 0."""
    src = av.AudioFrame.from_ndarray(np.clip(audio, -1, 1)[None, :], format="flt", layout="mono")
    src.sample_rate = sr
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=AAC_RATE)
    fifo = av.AudioFifo()
    for f in resampler.resample(src) + resampler.resample(None):
        f.pts = None
        fifo.write(f)
    n = stream.codec_context.frame_size or 1024
    pts = 0
    while fifo.samples > 0:
        f = fifo.read(n, partial=True)
        f.pts, f.time_base = pts, Fraction(1, AAC_RATE)
        pts += f.samples
        out.mux(stream.encode(f))
    out.mux(stream.encode(None))


def read_mp4(path) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Read a video file -> (uint8[T,H,W,3], float32[S] 16 kHz mono or None, fps)."""
    with _open(path) as c:
        if not c.streams.video:
            raise MediaError(f"no video stream: {path}")
        vs = c.streams.video[0]
        fps = float(vs.average_rate or vs.guessed_rate or 25)
        try:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(vs)]
        except (av.error.FFmpegError, ValueError) as e:
            raise MediaError(f"corrupt video ({_reason(e)}): {path}") from None
        if not frames:
            raise MediaError(f"video has no frames: {path}")
    with _open(path) as c:
        audio = _decode_audio(c, str(path), 16000) if c.streams.audio else None
    return np.stack(frames), audio, fps
