"""What the WebRTC transport alone costs lip sync, offline: a live level (or `render`) on the live test's audio,
with the speech passed through the Opus round trip a session's microphone takes (the client's 48 kHz mono
20 ms blocks -> aiortc's Opus encoder and decoder -> the server's AudioInput, as streaming/server.py pushes
them) and/or the frames through the VP8 round trip the picture takes back (aiortc's own encoder at its
starting bitrate, 500 kbps, and its decoder), then written to mp4 and scored as the live recordings are
(`syncavatar eval --window 60`). No clock, no network, no level changes: what is left of the gap between
this and a live recording is the live engine's timing and the ladder.

    .venv/bin/python docs/live/transport_check.py runs/speech60.wav OUT.json CANDIDATE ...

CANDIDATE: `render` (20 steps, uncached) or a level number of configs/default.toml's [[live.levels]] (10 steps),
each scored four ways: clean, Opus in, VP8 out, both. Quality only; nothing here is timed.
"""
import json
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.codecs.vpx import Vp8Decoder, Vp8Encoder, vp8_depayload
from aiortc.jitterbuffer import JitterFrame

from engine.audio import FPS, SAMPLE_RATE
from engine.caching import cache_config
from engine.config import DEFAULT_CONFIG, load_config
from engine.generator import load_avatar, render_frames
from engine.lipsync import evaluate
from engine.media import load_audio, write_mp4
from engine.model.avatar import load_model
from streaming.audio_in import AudioInput

MIC_RATE, MIC_FRAME = 48000, 960  # what clients/client.py's MicTrack sends: 20 ms blocks, s16 mono


def opus_round_trip(wav, n) -> np.ndarray:
    """The speech as the server hears it: n samples of 16 kHz mono float32, through Opus as a session's mic."""
    pcm = (np.clip(load_audio(wav, MIC_RATE), -1, 1) * 32767).round().astype(np.int16)
    pcm = np.pad(pcm, (0, -len(pcm) % MIC_FRAME + MIC_FRAME))  # one block of silence flushes the codec
    enc, dec, heard = OpusEncoder(), OpusDecoder(), AudioInput(keep_s=len(pcm) / MIC_RATE + 10)
    for k in range(len(pcm) // MIC_FRAME):
        frame = av.AudioFrame.from_ndarray(pcm[None, k * MIC_FRAME:(k + 1) * MIC_FRAME], format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = MIC_RATE, k * MIC_FRAME, Fraction(1, MIC_RATE)
        payloads, ts = enc.encode(frame)
        for p in payloads:
            for f in dec.decode(JitterFrame(data=p, timestamp=ts)):
                heard.push(f.to_ndarray().reshape(-1, len(f.layout.channels)), f.sample_rate)
    return np.pad(heard.buf, (0, max(0, n - len(heard.buf))))[:n]


def opus_delay(clean, heard, most=2000):
    """(samples by which `heard` lags `clean`, waveform SNR in dB once aligned): the codec's own delay. The
    server does not remove it, so the live model hears the speech this much late."""
    a = clean[SAMPLE_RATE:SAMPLE_RATE * 20]
    lag = int(np.argmax(np.correlate(heard[SAMPLE_RATE - most:SAMPLE_RATE * 20 + most], a, "valid"))) - most
    b = np.roll(heard, -lag)[most:-most]
    snr = 10 * np.log10(np.sum(clean[most:-most] ** 2) / max(np.sum((clean[most:-most] - b) ** 2), 1e-12))
    return lag, round(float(snr), 2)


def vp8_round_trip(frames) -> np.ndarray:
    """The frames as the client sees them: through aiortc's VP8 encoder (500 kbps to start) and decoder."""
    enc, dec, out = Vp8Encoder(), Vp8Decoder(), []
    for i, rgb in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts, frame.time_base = i * 90000 // FPS, Fraction(1, 90000)
        payloads, ts = enc.encode(frame, force_keyframe=(i == 0))
        got = dec.decode(JitterFrame(data=b"".join(vp8_depayload(p) for p in payloads), timestamp=ts))
        out.append(got[0].to_ndarray(format="rgb24") if got else out[-1])
    return np.stack(out)


def score(frames, audio, wav):
    with tempfile.TemporaryDirectory() as d:
        mp4 = Path(d) / "out.mp4"
        write_mp4(mp4, frames, FPS, audio, SAMPLE_RATE)
        e = evaluate(mp4, wav, window_s=60)
    return {"sync_conf": round(e["sync_conf"], 4), "offset_frames": e["offset_frames"]}


def main(wav, out, cands):
    torch.set_num_threads(1)
    cfg = load_config(DEFAULT_CONFIG)
    model, clean = load_model(cfg.path(cfg.model.weights)), load_audio(wav, SAMPLE_RATE)
    avatar, heard = load_avatar(cfg.engine.avatar), opus_round_trip(wav, len(clean))
    lag, snr = opus_delay(clean, heard)
    res = {"audio": wav, "opus_delay_ms": round(lag / SAMPLE_RATE * 1000, 2), "opus_snr_db_aligned": snr,
           "candidates": {}}
    print(f"opus round trip: {res['opus_delay_ms']} ms later, SNR {snr} dB once aligned", flush=True)
    for c in cands:
        if c == "render":
            kw = {"steps": cfg.model.steps, "cache": None, "guidance": cfg.model.guidance}
        else:
            lv = cfg.live.levels[int(c)]
            if lv.decoder or lv.decode_every != 1:
                raise SystemExit(f"level {c} uses its own decoder or decode_every: not covered here")
            kw = {"steps": cfg.live.steps, "guidance": lv.guidance if lv.guidance is not None else cfg.model.guidance,
                  "cache": cache_config(lv.cache, cfg.live.steps, schedule=cfg.path(lv.schedule),
                                        share_guidance=lv.share_guidance)}
        row = {}
        for name, audio in (("clean", clean), ("opus", heard)):
            frames, _ = render_frames(model, avatar, audio, seed=cfg.model.seed, noise_scale=cfg.model.noise_scale, **kw)
            row[name] = score(frames, audio, wav)
            row[name + "+vp8"] = score(vp8_round_trip(frames), audio, wav)
            print(c, name, row[name], "+vp8", row[name + "+vp8"], flush=True)
        res["candidates"][c] = row
        Path(out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
