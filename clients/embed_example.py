"""Embedding the engine without WebRTC (what presenter software does): feed microphone audio, get frames.

    .venv/bin/python -m clients.embed_example speech.wav out.mp4

Here the "microphone" is a file fed in real time, 20 ms at a time; the frames (25 fps, each with the
speech that belongs to it) are written to an mp4.
"""
import asyncio
import sys
import time

import numpy as np

from engine.media import load_audio, write_mp4
from streaming.worker import GenerationWorker
from streaming.session import Session
from engine.config import load_config


async def main(wav: str, out: str, avatar: str = "0") -> dict:
    engine = GenerationWorker(load_config())  # starts the generation worker process (model load, warm-up)
    session = Session(engine, avatar)
    pcm = (load_audio(wav, 48000) * 32767).astype(np.int16)  # like a 48 kHz microphone

    async def microphone():
        for k in range(0, len(pcm), 960):  # 20 ms at a time, in real time
            await asyncio.sleep(max(0.0, session.t0 + k / 48000 - time.monotonic()))
            session.push_audio(pcm[k:k + 960], 48000)

    mic = asyncio.ensure_future(microphone())
    frames, speech = [], []
    async for frame in session.frames():  # paced at 25 fps by the session clock; never stalls
        frames.append(frame.rgb)  # uint8 [128, 128, 3]
        speech.append(frame.audio)  # float32 [640]: this frame's speech, 16 kHz
        if frame.pts_s >= len(pcm) / 48000 + 0.2:
            break
    mic.cancel()
    session.close()
    engine.close()
    write_mp4(out, np.stack(frames), fps=25, audio=np.concatenate(speech), sr=16000)
    return session.stats()


if __name__ == "__main__":  # the guard matters: the engine's worker process is spawned
    print(asyncio.run(main(*sys.argv[1:])))
