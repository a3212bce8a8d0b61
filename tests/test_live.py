"""The live pipeline without WebRTC: audio in, VAD, chunker, backpressure policy, paced frames, telemetry."""
import asyncio
import threading
import time

import numpy as np
import pytest

from engine.media import load_audio
from streaming.audio_in import AudioInput
from streaming.engine import IdleLoop, ping_pong
from streaming.session import Session
from streaming.telemetry import Telemetry, messages
from syncavatar.config import load_config


def test_audio_input_resamples_downmixes_and_flags_speech(speech_wav):
    speech = load_audio(speech_wav, 48000)
    stereo = np.stack([speech, speech], 1)
    pcm = (np.concatenate([np.zeros((48000, 2)), stereo]) * 32767).astype(np.int16)
    a = AudioInput(vad_mode=3)
    for k in range(0, len(pcm), 960):  # 20 ms packets as aiortc delivers them
        a.push(pcm[k:k + 960], 48000)
    assert abs(a.end - len(pcm) / 3) <= 320  # 48 kHz -> 16 kHz
    flags = a.speech_frames(0, a.end // 640)
    assert not flags[:20].any()  # the leading second of digital silence
    assert flags[25:].mean() > 0.3  # the speech
    ref = load_audio(speech_wav, 16000)
    got = a.window(16000, 16000 + len(ref))
    lag = np.argmax(np.correlate(got[:8000], ref[:8000], "full")) - 7999
    assert abs(lag) <= 16  # the resampler keeps the timeline (within 1 ms)


def test_audio_input_window_pads_and_trim_bounds_memory():
    a = AudioInput()
    a.push(np.ones(16000, np.float32) * 0.5, 16000)
    w = a.window(-100, 100)
    assert (w[:100] == 0).all() and np.allclose(w[100:], 0.5, atol=1e-3)
    assert (a.window(15900, 16100)[100:] == 0).all()  # not arrived yet
    for _ in range(10):
        a.push(np.zeros(16000, np.float32), 16000)
        a.trim(a.end - 8000)
    assert len(a.buf) <= a.keep + 16000
    assert a.window(a.end - 100, a.end).shape == (100,)
    with pytest.raises(ValueError):
        a.push(np.zeros((10, 3), np.int16), 16000)
    with pytest.raises(ValueError):
        a.push(np.zeros(10, np.int16), 100)


def test_ping_pong_never_jumps():
    n = 9
    idx = [ping_pong(i, n) for i in range(100)]
    assert set(idx) == set(range(n))
    assert max(abs(a - b) for a, b in zip(idx, idx[1:])) == 1


def test_telemetry_pub_sub_and_listeners():
    port = __import__("conftest").free_port()
    addr = f"tcp://127.0.0.1:{port}"
    pub = Telemetry(addr)
    seen = []
    pub.listeners.append(lambda s, m: seen.append(m))
    got = []

    def sub():
        for m in messages(addr, "sess1", poll_s=0.1):
            if m is not None:
                got.append(m)
                if m.get("chunk") == 99:
                    return

    th = threading.Thread(target=sub)
    th.start()
    deadline = time.monotonic() + 10
    k = 0
    while th.is_alive() and time.monotonic() < deadline:  # slow joiner: publish until it arrives
        pub.publish("other", "chunk", 1.0, chunk=k)
        pub.publish("sess1", "chunk", 2.0, chunk=99 if k > 5 else k)
        k += 1
        time.sleep(0.05)
    th.join(1)
    pub.close()
    assert got and all(m["session"] == "sess1" for m in got)  # topic filter
    assert got[-1] == {"schema": 1, "type": "chunk", "session": "sess1", "t_ms": 2.0, "chunk": 99}
    assert len(seen) == 2 * k


# ------------------------------------------------------------------------------- fake engine
class FakeEngine:
    """Duck-typed Engine: generates gray frames after gen_ms on a thread; no model."""

    def __init__(self, gen_ms):
        from engine.model.dit import DiTConfig
        self.config = load_config()
        self.config.live.playout_delay_ms = 400
        self.cfg = DiTConfig()
        self.level_names = ["synccache", "synccache-stream"]
        self.gen_ms_true = gen_ms
        self.pending, self.jobs = 0, []
        self._idle = {"0": IdleLoop(np.zeros((8, 128, 128, 3), np.uint8))}

    def estimate_ms(self, level):
        return self.gen_ms_true[min(level, 1)]

    def predict_finish(self, level, now):
        return now + (self.pending + 1) * self.estimate_ms(level) / 1000

    def submit(self, job):
        self.pending += 1
        self.jobs.append(job)

        def run():
            time.sleep(self.gen_ms_true[job.level] / 1000)
            self.pending -= 1
            t = time.monotonic()
            frames = np.full((4, 128, 128, 3), 200, np.uint8)
            job.done(frames, {"gen_start": t, "gen_end": t, "gen_ms": 0, "computed_steps": 20,
                              "reused_steps": 0, "level": job.level})
        threading.Thread(target=run, daemon=True).start()

    def end_session(self, session):
        pass

    def worker_pids(self):
        return []

    def ready_idle_loop(self, avatar):
        return self._idle.get(avatar)

    async def idle_loop_async(self, avatar):
        return self._idle[avatar]


async def _run_session(engine, audio, seconds):
    msgs = []
    tele = Telemetry(None)
    tele.listeners.append(lambda s, m: msgs.append(m))
    s = Session(engine, "0", telemetry=tele)

    async def feed():
        for k in range(0, len(audio), 320):
            await asyncio.sleep(max(0, s.t0 + k / 16000 - time.monotonic()))
            s.push_audio(audio[k:k + 320], 16000)

    task = asyncio.ensure_future(feed())
    frames = []
    async for f in s.frames():
        frames.append(f)
        if f.pts_s >= seconds:
            break
    task.cancel()
    s.close()
    return s, frames, msgs


def _loud_audio(seconds):
    """A speech-like signal VAD accepts: a vowel-ish harmonic tone with syllable gating."""
    t = np.arange(int(seconds * 16000)) / 16000
    tone = sum(np.sin(2 * np.pi * f * t) / (i + 1) for i, f in enumerate([150, 300, 450, 600, 900]))
    gate = (np.sin(2 * np.pi * 3 * t) > -0.3).astype(np.float32)
    return (0.2 * tone * gate).astype(np.float32)


def test_session_frames_carry_their_own_audio_and_every_chunk_is_reported():
    engine = FakeEngine({0: 30, 1: 20})
    audio = _loud_audio(3.0)
    s, frames, msgs = asyncio.run(_run_session(engine, audio, 2.4))
    assert [f.index for f in frames] == list(range(len(frames)))  # one frame per tick, none skipped
    # the speech of frame i is the input audio of frame i: sound and picture share one timeline
    gap = int(s.audio.gap_samples)
    for f in frames[20:40]:
        src = f.index * 640 - gap
        if src >= 0:
            assert np.allclose(f.audio, audio[src:src + 640], atol=2e-3)
    kinds = {f.kind for f in frames}
    assert "speech" in kinds  # generated frames reached the output
    chunks = [m["chunk"] for m in msgs if m["type"] == "chunk"]
    assert chunks == list(range(len(frames) // 4))  # telemetry for every chunk, in order
    rec = next(m for m in msgs if m["type"] == "chunk" and m.get("kind") == "speech")
    for k in ("capture_ms", "ready_ms", "gen_start_ms", "gen_end_ms", "send_ms", "computed_steps", "reused_steps",
              "jobs_queued", "ready_frames", "av_offset_ms", "latency_est_ms"):
        assert k in rec, k
    assert not [m for m in msgs if m["type"] == "decision"]  # fast enough: no backpressure


def test_backpressure_raises_cache_then_idles_and_latency_stays_bounded():
    engine = FakeEngine({0: 400, 1: 250})  # far too slow for a 160 ms chunk
    s, frames, msgs = asyncio.run(_run_session(engine, _loud_audio(4.0), 3.6))
    decisions = [m for m in msgs if m["type"] == "decision"]
    assert decisions and decisions[0]["action"] == "raise"
    assert {d["level"] for d in decisions} >= {1, 2}  # first the boost cache, then idle chunks
    assert any(j.level == 1 for j in engine.jobs) and not any(j.level == 0 for j in engine.jobs[1:])
    chunk_msgs = [m for m in msgs if m["type"] == "chunk"]
    assert any(m.get("kind") == "skipped" for m in chunk_msgs)
    assert max(m.get("jobs_queued", 0) for m in chunk_msgs) <= engine.config.live.max_ahead_chunks
    assert max(len(s.ready), s.in_flight) <= engine.config.live.max_ahead_chunks * 4
    assert [f.index for f in frames] == list(range(len(frames)))  # output never stalls


def test_unknown_avatar_and_closed_session():
    engine = FakeEngine({0: 10, 1: 10})
    with pytest.raises(ValueError):
        Session(engine, "not-a-number")

    async def go():
        s = Session(engine, "0")
        s.close()
        with pytest.raises(RuntimeError):
            s.push_audio(np.zeros(320, np.float32), 16000)
    asyncio.run(go())


def test_ice_servers_from_config():
    from streaming.server import ice_server
    assert ice_server("stun:stun.example.org:3478").urls == "stun:stun.example.org:3478"
    turn = ice_server({"urls": "turn:t.example.org:3478", "username": "u", "credential": "p"})
    assert (turn.urls, turn.username, turn.credential) == ("turn:t.example.org:3478", "u", "p")
    with pytest.raises(ValueError):
        ice_server({"url": "stun:x"})


def test_telemetry_cli_table_and_csv(tmp_path, capsys):
    """`syncavatar telemetry --csv`: a line per message and a CSV row with the schema's columns."""
    import csv

    from streaming.telemetry import watch
    addr = f"tcp://127.0.0.1:{__import__('conftest').free_port()}"
    pub = Telemetry(addr)
    stop = threading.Event()

    def publish():  # until the watcher has had time to join (slow joiner), then a little more
        k = 0
        while not stop.is_set():
            pub.publish("s1", "chunk", 40.0 * k, chunk=k, kind="speech", gen_ms=120.5, latency_est_ms=650.0)
            k += 1
            time.sleep(0.02)

    th = threading.Thread(target=publish)
    th.start()
    try:
        n = watch(addr, csv_path=str(tmp_path / "t.csv"), duration=1.5)
    finally:
        stop.set()
        th.join()
        pub.close()
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert n > 5 and len(rows) == n
    assert rows[-1]["type"] == "chunk" and rows[-1]["gen_ms"] == "120.5" and rows[-1]["session"] == "s1"
    assert [int(r["chunk"]) for r in rows] == list(range(int(rows[0]["chunk"]), int(rows[0]["chunk"]) + n))
    out = capsys.readouterr().out
    assert "chunk=" in out and "latency_est_ms=650.0" in out


def test_server_turns_extra_sessions_away_and_expires_unconnected_ones(monkeypatch):
    """In-process server with a fake engine: 503 past max_sessions, a peer that never connects is dropped."""
    import aioice.ice
    from aiohttp.test_utils import TestClient, TestServer
    from aiortc import RTCPeerConnection

    from streaming.server import AvatarServer

    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda *a, **k: ["127.0.0.1"])  # loopback only

    async def go():
        engine = FakeEngine({0: 10, 1: 10})
        engine.config.server.max_sessions = 1
        engine.config.server.connect_timeout_s = 0.5
        server = AvatarServer(engine.config, engine, Telemetry(None))
        pc = RTCPeerConnection()
        pc.addTransceiver("audio", direction="sendrecv")
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        offer = {"sdp": pc.localDescription.sdp, "type": "offer", "avatar": "0"}
        async with TestClient(TestServer(server.app())) as client:
            r = await client.post("/offer", json=offer)
            assert r.status == 200 and (await r.json())["type"] == "answer"
            r = await client.post("/offer", json=offer)
            assert r.status == 503 and "full" in (await r.json())["error"]
            await asyncio.sleep(1.5)  # nobody answers our end: the session expires
            assert not server.connections
            r = await client.post("/offer", json=offer)
            assert r.status == 200  # the slot is free again
        await pc.close()
    asyncio.run(go())


def test_audio_jitter_frames_patches_only_audio_receivers(monkeypatch):
    import aiortc.rtcrtpreceiver as receiver

    from streaming.server import use_audio_jitter_frames
    monkeypatch.setattr(receiver, "JitterBuffer", receiver.JitterBuffer)  # undone after the test
    use_audio_jitter_frames(1)
    use_audio_jitter_frames(2)  # applying twice wraps the original, not the wrapper
    audio = receiver.JitterBuffer(capacity=16, prefetch=4)
    video = receiver.JitterBuffer(capacity=128, is_video=True)
    assert audio._prefetch == 2 and video._prefetch == 0
    assert receiver._syncavatar_jitter_buffer.__name__ == "JitterBuffer"


def test_auto_precision_keeps_the_faster():
    """precision = "auto": the worker times bf16 and fp32 chunks at start-up and keeps the faster one,
    whichever it is on this CPU."""
    from types import SimpleNamespace

    from streaming.engine import _pick_precision

    class Stub:
        def __init__(self, bf16_ms, fp32_ms):
            self.config = SimpleNamespace(engine=SimpleNamespace(avatar="0"))
            self.bf16, self.ms = None, {True: bf16_ms, False: fp32_ms}

        def chunk(self, session, avatar, window, level, idle_motion):
            return None, {"gen_ms": self.ms[self.bf16]}

    for bf16_ms, fp32_ms, want in ((270.0, 175.0, "fp32"), (90.0, 120.0, "bf16")):
        w = Stub(bf16_ms, fp32_ms)
        assert _pick_precision(w, None) == want and w.bf16 == (want == "bf16")
