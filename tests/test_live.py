"""The live pipeline without WebRTC: audio in, VAD, chunker, backpressure policy, paced frames, telemetry."""
import asyncio
import threading
import time

import numpy as np
import pytest

from engine.media import load_audio
from streaming.audio_in import AudioInput
from streaming.protocol import ping_pong
from streaming.worker import IdleLoop
from streaming.session import Session
from streaming.telemetry import Telemetry, messages
from engine.config import load_config


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
    """Duck-typed GenerationWorker: generates gray frames after gen_ms on a thread; no model."""

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

    def predict_finish(self, level, now, session=None):
        return now + (self.pending + 1) * self.estimate_ms(level) / 1000

    def keeps_up(self, level):
        return self.estimate_ms(level) <= 160

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


async def _run_session(engine, audio, seconds, first_audio_s=0.0):
    """A session fed `audio` in real time from first_audio_s after it was created (connection set-up) until
    frame `seconds` went out -> (session, frames, telemetry messages)."""
    msgs = []
    tele = Telemetry(None)
    tele.listeners.append(lambda s, m: msgs.append(m))
    s = Session(engine, "0", telemetry=tele)

    async def feed():
        await asyncio.sleep(first_audio_s)
        start = time.monotonic()
        for k in range(0, len(audio), 320):
            await asyncio.sleep(max(0, start + k / 16000 - time.monotonic()))
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


def test_session_clock_starts_with_the_first_audio_so_frames_line_up_with_the_speech_sent():
    """The mic's first audio comes 120 ms after the session was made, before frame 0 is due (400 ms): no
    silence is put before it, so frame i carries exactly the i-th 40 ms of what was pushed, as a recording
    compared with the sent speech assumes. A worker's chunk grid puts up to one chunk of silence first."""
    audio = _loud_audio(2.0)
    s, frames, _ = asyncio.run(_run_session(FakeEngine({0: 10, 1: 10}), audio, 1.2, first_audio_s=0.12))
    assert s.audio.gap_samples == 0
    for f in frames[:30]:
        assert np.allclose(f.audio, audio[f.index * 640:(f.index + 1) * 640], atol=2e-3), f.index

    engine = FakeEngine({0: 10, 1: 10})
    grid0 = time.monotonic() - 0.05
    engine.aligned_start = lambda t: grid0 + (t - grid0) // 0.16 * 0.16
    s, frames, _ = asyncio.run(_run_session(engine, audio, 1.2, first_audio_s=0.12))
    gap = int(s.audio.gap_samples)
    assert 0 <= gap < 0.16 * 16000
    assert (s.t0 - grid0) / 0.16 == pytest.approx(round((s.t0 - grid0) / 0.16), abs=1e-6)  # on the grid
    for f in frames[5:30]:
        assert np.allclose(f.audio, audio[f.index * 640 - gap:(f.index + 1) * 640 - gap], atol=2e-3), f.index


def test_session_without_audio_before_frame_0_keeps_its_start_and_fills_the_wait_with_silence():
    """A mic that starts after frame 0 went out (600 ms > the 400 ms playout delay): frames flowed from the
    session's start, and the wait before the first audio is silence on the input timeline."""
    audio = _loud_audio(1.5)
    s, frames, _ = asyncio.run(_run_session(FakeEngine({0: 10, 1: 10}), audio, 1.6, first_audio_s=0.6))
    gap = int(s.audio.gap_samples)
    assert gap >= 0.4 * 16000  # at least the playout delay passed before any audio
    assert [f.index for f in frames] == list(range(len(frames)))
    for f in frames:
        src = f.index * 640 - gap
        if src >= 0 and src + 640 <= len(audio):
            assert np.allclose(f.audio, audio[src:src + 640], atol=2e-3), f.index


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


class FirstFrameEngine(FakeEngine):
    """FakeEngine that sends a chunk's first frame early (Job.early) and the other three later, as the
    worker's decode stage does; frame k of a chunk is filled with 100 + k."""

    tail_s = 0.02  # from the first frame to the other three

    def submit(self, job):
        self.pending += 1
        self.jobs.append(job)

        def run():
            frames = (100 + np.arange(4, dtype=np.uint8))[:, None, None, None].repeat(128, 1).repeat(128, 2)
            frames = frames.repeat(3, 3)
            start = time.monotonic()
            time.sleep(0.02)
            job.early(frames[:1], time.monotonic())
            time.sleep(self.tail_s)
            self.pending -= 1
            job.done(frames[1:], {"gen_start": start, "gen_end": time.monotonic(), "computed_steps": 10,
                                  "reused_steps": 0, "level": job.level, "first": 1, "decode_ms": 30.0})
        threading.Thread(target=run, daemon=True).start()


def test_a_chunks_first_frame_sent_early_and_the_rest_land_in_place():
    engine = FirstFrameEngine({0: 40, 1: 30})
    s, frames, msgs = asyncio.run(_run_session(engine, _loud_audio(3.0), 2.4))
    speech = [f for f in frames if f.kind == "speech"]
    assert len(speech) >= 20
    assert all(int(f.rgb[0, 0, 0]) == 100 + f.index % 4 for f in speech)  # frame k of its chunk, each in place
    recs = [m for m in msgs if m["type"] == "chunk" and m.get("kind") == "speech"]
    assert recs and all(m["gen_start_ms"] < m["first_ready_ms"] < m["gen_end_ms"] for m in recs)
    assert all(m["decode_ms"] == 30.0 for m in recs)


class SlowTailEngine(FirstFrameEngine):
    """FirstFrameEngine whose chunks finish 450 ms after their first frame, after their last frame went out
    (a worker whose decoding fell behind, as on a loaded CPU)."""

    tail_s = 0.45


def test_a_chunk_still_generating_when_its_last_frame_goes_out_is_reported_with_its_timings_in_order():
    """Its telemetry waits for the chunk's end (later chunks' records queue behind it), so every generated
    chunk's record carries gen_start_ms .. reused_steps, and the records still come one per chunk, in order."""
    s, frames, msgs = asyncio.run(_run_session(SlowTailEngine({0: 10, 1: 10}), _loud_audio(3.0), 2.4))
    chunks = [m for m in msgs if m["type"] == "chunk"]
    assert [m["chunk"] for m in chunks] == list(range(len(frames) // 4))
    tails = [m for m in chunks if m["kind"] == "speech" and m.get("late_frames") == 3]
    assert tails  # the case at hand: first frame shown, the other three after their time
    ended = [m for m in chunks if m.get("reason") == "the session ended during its generation"]
    assert len(ended) <= 3 and all(m["chunk"] > chunks[-1]["chunk"] - 4 for m in ended)  # only the last ones
    for m in [m for m in chunks if m["kind"] in ("speech", "late") and m not in ended]:
        for k in ("gen_start_ms", "first_ready_ms", "gen_end_ms", "gen_ms", "computed_steps", "reused_steps"):
            assert k in m, (m["chunk"], k)
        assert m["gen_end_ms"] > m["send_ms"] + 3 * 40 - 1  # it did end after its last frame went out


class LosesChunkEngine(FakeEngine):
    """FakeEngine that never answers for chunk 2 (a worker that lost it); the others come back at once."""

    def submit(self, job):
        if len(self.jobs) == 2:
            self.jobs.append(job)
            return
        super().submit(job)


def test_a_chunk_the_worker_never_answers_for_holds_the_records_after_it_back_only_so_long(monkeypatch):
    import streaming.session
    monkeypatch.setattr(streaming.session, "MAX_HELD_CHUNKS", 3)
    s, frames, msgs = asyncio.run(_run_session(LosesChunkEngine({0: 10, 1: 10}), _loud_audio(3.0), 2.4))
    chunks = [m for m in msgs if m["type"] == "chunk"]
    assert [m["chunk"] for m in chunks] == list(range(len(frames) // 4))  # every chunk, in order
    lost = [m for m in chunks if m.get("reason") == "its generation outlasted 3 later chunks"]
    assert len(lost) == 1 and "gen_start_ms" not in lost[0]
    later = [m for m in chunks if m["chunk"] > lost[0]["chunk"] and m["kind"] == "speech"]
    assert later and all("gen_start_ms" in m for m in later)


class SimClock:
    """A session clock the test moves by hand (seconds)."""

    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


class SimEngine(FakeEngine):
    """FakeEngine on a simulated clock: one worker, first come first served, gen_ms(level, t) per chunk; its
    predictions are exact, like a well-calibrated GenerationWorker."""

    def __init__(self, clock, gen_ms):
        super().__init__({})
        self.clock, self.gen_ms_at = clock, gen_ms
        self.free_at, self.queue = 0.0, []  # (gen start, gen end, job)

    def estimate_ms(self, level):
        return self.gen_ms_at(level, self.clock())

    def predict_finish(self, level, now, session=None):
        return max(now, self.free_at) + self.estimate_ms(level) / 1000

    def submit(self, job):
        start = max(self.clock(), self.free_at)
        self.free_at = start + self.estimate_ms(job.level) / 1000
        self.pending += 1
        self.jobs.append(job)
        self.queue.append((start, self.free_at, job))

    def finish_one(self, until):
        """Complete the next job if it ends by `until`, at its end time; -> whether one did."""
        if not self.queue or self.queue[0][1] > until:
            return False
        start, end, job = self.queue.pop(0)
        self.clock.t = end
        self.pending -= 1
        job.done(np.full((4, 128, 128, 3), 200, np.uint8),
                 {"gen_start": start, "gen_end": end, "gen_ms": (end - start) * 1000, "computed_steps": 10,
                  "reused_steps": 0, "level": job.level})
        return True


async def _simulate_session(engine, clock, audio, seconds):
    """Run a session on simulated time: 20 ms mic packets as their audio completes, the worker's chunks
    as they finish, frames as they are due; instant and the same on every run."""
    msgs = []
    tele = Telemetry(None)
    tele.listeners.append(lambda s, m: msgs.append(m))
    s = Session(engine, "0", telemetry=tele, clock=clock)
    out = s.frames()
    frames, k = [], 0
    while not frames or frames[-1].pts_s < seconds:
        due = s.t0 + s.delay_s + len(frames) * 0.04
        while True:  # every event before the frame is due, in time order
            push_t = s.t0 + (k + 320) / 16000 if k < len(audio) else float("inf")
            if engine.finish_one(min(push_t, due)):
                await asyncio.sleep(0)  # the session forms waiting chunks (call_soon_threadsafe)
            elif push_t <= due:
                clock.t = push_t
                s.push_audio(audio[k:k + 320], 16000)
                k += 320
            else:
                break
        clock.t = due
        frames.append(await out.__anext__())
    await out.aclose()
    s.close()
    return s, frames, msgs


def test_backpressure_raises_cache_then_idles_then_recovers_on_simulated_time():
    """A worker far too slow for 160 ms chunks (400 / 250 ms) for 2 s, then fast: the session raises the
    cache, skips chunks, keeps every queued chunk on time and its queues bounded, and steps back down."""
    clock = SimClock()
    t_fast = clock.t + 2.0
    engine = SimEngine(clock, lambda level, t: (400, 250)[level] if t < t_fast else (60, 40)[level])
    live = engine.config.live
    s, frames, msgs = asyncio.run(_simulate_session(engine, clock, _loud_audio(6.0), 5.6))
    decisions = [m for m in msgs if m["type"] == "decision"]
    assert decisions[0]["action"] == "raise" and decisions[0]["level"] == 1
    assert {d["level"] for d in decisions if d["action"] == "raise"} == {1, 2}  # the boost cache, then skips
    assert decisions[-1] == {**decisions[-1], "action": "lower", "level": 0, "level_name": "synccache"}
    assert s.level == 0 and engine.jobs[-1].level == 0  # recovered once the worker was fast again
    assert [j.level for j in engine.jobs[:1]] == [1]  # the first chunk already went at the boost level
    chunks = [m for m in msgs if m["type"] == "chunk"]
    assert [m["chunk"] for m in chunks] == list(range(len(frames) // 4))
    assert any(m["kind"] == "skipped" for m in chunks)
    # predictions are exact here, so a generated chunk is late only when it went to an idle worker at the
    # boost level (generated although predicted late, to keep the worker's timing fresh)
    generated = [m for m in chunks if m.get("gen_end_ms") is not None]
    late = [m for m in generated if m["gen_end_ms"] > m["deadline_ms"] - live.safety_ms + 0.1]
    assert len(generated) > 20 and late and all(m["jobs_queued"] == 0 and m["level"] == 1 for m in late)
    assert sum(m.get("late_frames", 0) for m in chunks) == s.counts["late_frames"] > 0
    last_raise = [d for d in decisions if d["action"] == "raise"][-1]
    assert decisions[-1]["t_ms"] - last_raise["t_ms"] >= live.recover_chunks * 160  # no early step down
    assert max(m["jobs_queued"] for m in chunks) <= live.max_ahead_chunks
    assert max(m["ready_frames"] for m in chunks) <= live.max_ahead_chunks * 4
    seconds = [m for m in msgs if m["type"] == "second"]
    assert len(seconds) == 6 and all(m["fps_in"] == 25.0 for m in seconds)
    assert all(m["fps_out"] == 25.0 for m in seconds[1:])  # frames go out from 400 ms on, then never stall
    assert all(m["threads"] > 0 and m["open_files"] > 0 and m["rss_mb"] > 0 for m in seconds)


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


def test_live_levels_from_config(tmp_path):
    """The shipped ladder: each level up is cheaper (more reuse, then no guidance, then a cheaper decoder
    or fewer frames decoded); telemetry names each level by its plan; [[live.levels]] tables are checked;
    the old single-plan keys say where they went."""
    from engine.config import ConfigError, LevelConfig, LiveConfig
    from synccache import Schedule
    levels = load_config().live.levels
    assert LiveConfig().levels == levels  # the dataclass's default is the ladder configs/default.toml ships
    reused = [sum(map(sum, Schedule.load(load_config().path(lvl.schedule)).reuse)) for lvl in levels]
    guidance = [3.0 if lvl.guidance is None else lvl.guidance for lvl in levels]
    cost = list(zip(reused, [-g for g in guidance], [bool(lvl.decoder) for lvl in levels],
                    [lvl.decode_every for lvl in levels]))
    assert len(levels) >= 3 and cost == sorted(set(cost)), cost  # strictly cheaper at every step up
    assert [lvl.name() for lvl in levels][:2] == ["synccache (ref-XS-10-gentle), shared guidance",
                                                  "synccache (ref-XS-10-boost), shared guidance"]
    assert LevelConfig("synccache", "a.json", 1.0, share_guidance=True).name() == "synccache (a), guidance 1"
    assert LevelConfig("none").name() == "none" and levels[-1].name().endswith(", decoder decoder-lite")
    assert all(load_config().path(lvl.decoder).exists() for lvl in levels if lvl.decoder)
    cfg = tmp_path / "live.toml"
    cfg.write_text('[live]\nsteps = 10\n[[live.levels]]\nschedule = "configs/synccache/ref-XS-10.json"\n'
                   '[[live.levels]]\ncache = "none"\nguidance = 1\n')
    assert load_config(cfg).live.levels == [LevelConfig("synccache", "configs/synccache/ref-XS-10.json"),
                                            LevelConfig("none", "", 1.0)]
    for text, match in [('[live]\nboost_schedule = "x.json"\n', "moved to \\[\\[live.levels\\]\\]"),
                        ("[live]\nlevels = []\n", "at least one level"),
                        ("[live]\nlevels = [3]\n", "must be a table"),
                        ("[[live.levels]]\nschedul = 'x.json'\n", "unknown key \\[live.levels\\[0\\]\\] schedul"),
                        ("[[live.levels]]\nguidance = 0.5\n", "guidance must be a number >= 1.0"),
                        ("[[live.levels]]\ndecode_every = 0\n", "decode_every must be a whole number >= 1"),
                        ("[[live.levels]]\ncache = 'fora'\nshare_guidance = true\n", "share_guidance is SyncCache's"),
                        ("[[live.levels]]\nshare_guidance = 1\n", "share_guidance must be bool")]:
        cfg.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_config(cfg)


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

    from streaming.worker_process import _pick_precision

    class Stub:
        def __init__(self, bf16_ms, fp32_ms):
            self.config = SimpleNamespace(engine=SimpleNamespace(avatar="0"))
            self.bf16, self.ms = None, {True: bf16_ms, False: fp32_ms}

        def chunk(self, session, avatar, window, level, idle_motion):
            return None, {"gen_ms": self.ms[self.bf16]}

    for bf16_ms, fp32_ms, want in ((270.0, 175.0, "fp32"), (90.0, 120.0, "bf16")):
        w = Stub(bf16_ms, fp32_ms)
        assert _pick_precision(w, None) == want and w.bf16 == (want == "bf16")
