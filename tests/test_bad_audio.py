"""Bad microphone audio through a live session (the real model): 25 fps, nothing raised, no broken frames.

One session is fed, in real time and in a row: silence, clipped speech, speech on a DC offset, full-scale
noise bursts, NaN/inf samples (a broken float driver), a full-scale int16 square wave at 48 kHz stereo,
long speech without pauses and a long silence. Every case must keep the output at one frame per 40 ms,
report no errors, and never draw a broken picture.
"""
import asyncio
import time

import numpy as np

from engine.config import load_config
from engine.media import load_audio
from streaming.session import Session
from streaming.telemetry import Telemetry
from streaming.worker import GenerationWorker


def _speech(tmp_path, name, text, voice):
    from conftest import _espeak_wav
    wav = _espeak_wav(tmp_path / f"{name}.wav", text, voice=voice)
    return load_audio(wav, 16000).astype(np.float32)


def _cases(tmp_path):
    """(name, pcm, rate) in the order they are fed."""
    rng = np.random.default_rng(0)
    a = _speech(tmp_path, "a", "Please keep the receipts for the new chairs in the top drawer.", "en-us+m2")
    long = np.concatenate([_speech(tmp_path, f"l{i}", t, "en-gb+f4") for i, t in enumerate([
        "We walked along the river until the lights of the town came on and the wind turned cold",
        "then somebody suggested that we should take the late train home instead of waiting for the bus"])])
    nonfinite = np.zeros(8000, np.float32)
    nonfinite[::3], nonfinite[1::3], nonfinite[2::3] = np.nan, np.inf, -np.inf
    t48 = np.arange(48000) / 48000
    square = (np.sign(np.sin(2 * np.pi * 220 * t48)) * 32767).astype(np.int16)
    burst = a[:32000].copy()
    burst[8000:12000] = rng.uniform(-1, 1, 4000)  # a door slam in the middle of a word
    return [("silence", np.zeros(32000, np.float32), 16000),
            ("clipped", np.clip(a * 8, -1, 1), 16000),
            ("clipped beyond full scale", a * 8, 16000),  # a float mic may hand out > 1.0
            ("dc offset", a * 0.5 + 0.45, 16000),
            ("burst", burst, 16000),
            ("nan/inf", nonfinite, 16000),
            ("int16 square 48 kHz stereo", np.stack([square, square], 1), 48000),
            ("long speech", long, 16000),
            ("long silence", np.zeros(16000 * 5, np.float32), 16000)]


def test_bad_audio_keeps_25_fps_and_raises_nothing(tmp_path):
    cases = _cases(tmp_path)
    engine = GenerationWorker(load_config())

    async def run():
        msgs = []
        tele = Telemetry(None)
        tele.listeners.append(lambda sid, m: msgs.append(m))
        s = Session(engine, "0", telemetry=tele)
        spans = []  # (name, first frame, last frame) of each case on the session clock

        async def feed():
            pos = 0.0  # seconds of input pushed
            for name, pcm, rate in cases:
                start = pos
                step = rate // 50  # 20 ms packets, as WebRTC delivers them
                for k in range(0, len(pcm), step):
                    await asyncio.sleep(max(0.0, s.t0 + pos - time.monotonic()))
                    s.push_audio(pcm[k:k + step], rate)
                    pos += len(pcm[k:k + step]) / rate
                spans.append((name, int(start * 25), int(pos * 25)))
            return pos

        task = asyncio.ensure_future(feed())
        frames = []
        async for f in s.frames():
            frames.append(f)
            if task.done() and f.pts_s >= task.result() + 1.0:
                break
        s.close()
        return s, frames, msgs, spans

    try:
        s, frames, msgs, spans = asyncio.run(run())
    finally:
        engine.close()
    assert [f.index for f in frames] == list(range(len(frames)))  # one frame per 40 ms tick, none skipped
    chunks = [m for m in msgs if m["type"] == "chunk"]
    assert not [m for m in chunks if m["kind"] == "error"], [m for m in chunks if m["kind"] == "error"][:2]
    assert s.counts.get("errors", 0) == 0
    seconds = [m for m in msgs if m["type"] == "second"][1:-1]
    assert seconds and min(m["fps_out"] for m in seconds) >= 24
    # every frame is a picture of the avatar: the background of the reference stays (a NaN latent decodes to
    # a flat or black frame), and speech was generated for the cases that contain speech
    ref = s.portrait.astype(np.float32)
    for f in frames:
        assert np.isfinite(f.audio).all() and np.abs(f.audio).max() <= 1.0
        diff = np.abs(f.rgb.astype(np.float32) - ref).mean()
        assert diff < 40, (f.index, f.kind, diff)
    kinds = {name: {f.kind for f in frames[a:b]} for name, a, b in spans}
    for name in ("clipped", "dc offset", "long speech"):
        assert "speech" in kinds[name], (name, kinds[name])
    assert kinds["long silence"] <= {"idle", "speech"}
