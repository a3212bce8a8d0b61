"""One live session: audio in (push_audio) -> chunker -> shared generation worker -> paced frames out.

The embedding API for presenter software; the WebRTC server is built on it:

    session = Session(engine, avatar="0")
    session.push_audio(pcm, 48000)          # from the event loop, in real time, any rate / channels
    async for frame in session.frames():    # 25 fps, paced by the session clock, never stalls
        show(frame.rgb); play(frame.audio)  # frame.audio: the speech of this frame, 16 kHz

One clock: sample n of the input is "captured" at t0 + n / 16000 (network gaps are filled with silence
so the input keeps pace), and frame i goes out at t0 + D + i / 25 with the input audio of that same frame,
so sound and picture cannot drift apart. D is `playout_delay_ms`. t0 is where the first audio pushed
begins, when that comes before frame 0 is due (so frame i carries the i-th 40 ms of what was pushed, and a
recording lines up with the speech sent, whatever the connection set-up took); else the session's start.
A worker that batches sessions puts t0 on its shared chunk grid (up to one chunk of silence first).

Backpressure: before queueing a speech chunk the policy predicts when it would be ready; if that misses
the chunk's deadline it raises the level (a cheaper rung of `[[live.levels]]`: more reuse, no
guidance), and if the top one is still late it turns the chunk idle (skip); it also leaves a level the
worker cannot keep up chunk after chunk (`keeps_up`). After `recover_chunks` chunks on time it steps
back down a level, never to one the worker cannot keep up. Every decision is published to telemetry. The queue holds at
most `max_ahead_chunks` chunks, so latency stays bounded.

What is pure (which audio forms a chunk and when, the policy, the chunk records) lives in
`streaming/policy.py`; this module is the I/O around it: audio in, the worker's callbacks, pacing, publishing.
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from engine.audio import SAMPLE_RATE, SAMPLES_PER_FRAME
from engine.data.portraits import canonical_avatar
from engine.generator import load_avatar
from engine.model.audio_encoder import MARGIN_FRAMES
from streaming.audio_in import AudioInput
from streaming.worker import GenerationWorker, Job
from streaming.policy import FRAME_S, Backpressure, Chunker, ChunkRecord, Decision, frame_kind
from streaming.procstats import ProcessStats
from streaming.telemetry import Telemetry

# the most chunk records that wait behind one whose generation has not ended (4 chunks of 160 ms a second):
# a worker that never answers for a chunk delays the session's telemetry by at most this many, not forever
MAX_HELD_CHUNKS = 25


@dataclass
class Frame:
    """One outgoing video frame with its speech."""
    index: int  # frame number since the session started
    rgb: np.ndarray  # uint8 [128, 128, 3]
    audio: np.ndarray  # float32 [640]: 16 kHz input audio of this frame (the delayed speech)
    kind: str  # "speech" (generated), "idle" (silence), "late" (generation missed its deadline)
    t_ms: float  # session clock when it went out

    @property
    def pts_s(self) -> float:
        return self.index * FRAME_S


class LoopMonitor:
    """Measures how late the event loop wakes a 10 ms timer: the longest block in each interval (real time,
    whatever the session's clock)."""

    def __init__(self, period_s=0.01):
        self.period, self.max_ms, self.task = period_s, 0.0, None

    def start(self):
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self):
        while True:
            t = time.monotonic()
            await asyncio.sleep(self.period)
            self.max_ms = max(self.max_ms, (time.monotonic() - t - self.period) * 1000)

    def take(self) -> float:
        m, self.max_ms = self.max_ms, 0.0
        return round(m, 1)

    def stop(self):
        if self.task is not None:
            self.task.cancel()
            self.task = None


class Session:
    """A live avatar session; see the module docstring. push_audio / frames / close from one event loop.

    clock: monotonic seconds. The real GenerationWorker predicts and times chunks on time.monotonic, so only a fake
    engine goes with another clock (tests that simulate time).
    """

    def __init__(self, engine: GenerationWorker, avatar: str = "0", session_id: str | None = None,
                 telemetry: Telemetry | None = None, clock: Callable[[], float] = time.monotonic):
        self.engine, self.avatar = engine, canonical_avatar(avatar)  # ValueError for an unknown avatar
        self.id = session_id or uuid.uuid4().hex[:12]
        self.live = live = engine.config.live
        self.telemetry = telemetry or Telemetry(None)
        self.portrait = load_avatar(self.avatar).rgb  # ValueError for an unknown avatar, before anything starts
        self.cfg = cfg = engine.cfg
        self.W = cfg.frames
        self.audio = AudioInput(live.vad_mode)
        self.delay_s = live.playout_delay_ms / 1000
        self.chunker = Chunker(cfg.frames, cfg.lookback, cfg.lookahead, MARGIN_FRAMES, live.lookahead_wait,
                               live.hangover_ms, self.delay_s)
        self.policy = Backpressure(len(engine.level_names), live.recover_chunks, live.safety_ms / 1000)
        self.clock = clock
        self._align = getattr(engine, "aligned_start", None)  # share the worker's chunk grid (batching)
        self.t0 = clock()  # provisional: _start_clock fixes it at the first audio, or when frame 0 is due
        self._t0_fixed = False
        self.closed = False
        self._lock = threading.Lock()  # ready frames and chunk records are written by the worker thread
        self.ready: dict[int, np.ndarray] = {}  # frame index -> rgb
        self.chunks: dict[int, ChunkRecord] = {}  # chunk -> telemetry record, until its last frame went out
        self.generating: dict[int, ChunkRecord] = {}  # chunk -> its record, from submission until the worker is done
        # records whose last frame went out, published in chunk order once the chunk's generation has ended
        # (a chunk still generating holds the records after it back, so that its own carries its timings)
        self._outbox: deque[ChunkRecord] = deque()
        self.next_chunk = 0  # next chunk to form
        self.play_index = 0  # next frame to go out
        self.idle_motion = None  # after idle chunks: the next generated chunk continues from idle frames
        self.arrivals: list[tuple[int, float]] = []  # (input end sample, clock time of its arrival)
        self.counts = {"frames_out": 0, "late_frames": 0, "idle_frames": 0, "speech_frames": 0,
                       "samples_in": 0, "pushes": 0, "dropped_late": 0, "errors": 0}
        self._sec = {"t": self.t0, "frames_out": 0, "samples_in": 0, "late_frames": 0}
        self._sent = {"video": {}, "audio": {}}  # frame index -> clock time the tracks sent it
        self._procstats: ProcessStats | None = None  # this process and the generation worker, from the first second
        self._loop = None
        self.monitor = LoopMonitor()
        self.idle = engine.ready_idle_loop(self.avatar)
        self.publish("session", event="start", avatar=self.avatar, playout_delay_ms=live.playout_delay_ms,
                     cache=engine.level_names[0])

    @property
    def in_flight(self) -> int:
        """This session's chunks queued or generating."""
        return len(self.generating)

    @property
    def level(self) -> int:
        """The policy's cache level for the next speech chunk (0: the configured plan; higher: more reuse)."""
        return self.policy.level

    # ----------------------------------------------------------------------------------- clock
    def _start_clock(self, t: float) -> None:
        """Fix the session's clock zero at t (snapped back onto the worker's chunk grid, if it has one)."""
        self.t0 = self._align(t) if self._align is not None else t
        self._t0_fixed = True
        self._sec["t"] = self.t0

    def clock_ms(self, t: float | None = None) -> float:
        return ((self.clock() if t is None else t) - self.t0) * 1000

    def publish(self, type_, **fields):
        return self.telemetry.publish(self.id, type_, self.clock_ms(), **fields)

    # ------------------------------------------------------------------------------- audio in
    def push_audio(self, pcm, sample_rate: int) -> None:
        """Feed microphone audio (int16 or float32, [n] or [n, channels]) as it is captured."""
        if self.closed:
            raise RuntimeError(f"session {self.id} is closed")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        now = self.clock()
        pcm = np.asarray(pcm)
        n_in = round(len(pcm) * SAMPLE_RATE / sample_rate) if sample_rate else 0
        if not self._t0_fixed:  # the first audio, before frame 0 went out: the input starts with it
            self._start_clock(now - n_in / SAMPLE_RATE)
        # the input must keep pace with the clock: before the first audio (when it came after frame 0, or
        # the chunk grid put t0 earlier) and after a network gap longer than gap_fill_ms, pad silence so
        # that this push ends "now"
        lag = (now - self.t0) * SAMPLE_RATE - (self.audio.end + n_in)
        if lag > 0 and (self.counts["pushes"] == 0 or lag > self.live.gap_fill_ms / 1000 * SAMPLE_RATE):
            self.audio.pad_silence(int(lag))
        n = self.audio.push(pcm, sample_rate)
        self.counts["samples_in"] += n
        self.counts["pushes"] += 1
        self.arrivals.append((self.audio.end, now))
        if len(self.arrivals) > 500:
            del self.arrivals[:250]
        self._form_chunks()

    def _arrival(self, sample: int) -> float | None:
        """Clock time the given input sample arrived (None if before what is remembered)."""
        for end, t in self.arrivals:
            if end > sample:
                return t
        return None

    # -------------------------------------------------------------------------------- chunker
    def _form_chunks(self):
        """Form every chunk whose audio has arrived, while the queue has room: idle, skipped or a job."""
        ch = self.chunker
        while (not self.closed and self.audio.end >= ch.needed(self.next_chunk)
               and self.in_flight < self.live.max_ahead_chunks):
            c = self.next_chunk
            self.next_chunk += 1
            now = self.clock()
            arr = self._arrival(c * self.W * SAMPLES_PER_FRAME)
            times = {"capture_ms": round(self.clock_ms(arr), 1) if arr is not None else None,
                     "ready_ms": round(self.clock_ms(now), 1), "deadline_ms": round(ch.deadline_s(c) * 1000, 1)}
            kind = ch.plan(c, now - self.t0, self.audio.speech_frames)
            if kind != "speech":
                reason = "input arrived after the deadline" if kind == "late" else None
                self._idle_chunk(ChunkRecord(c, kind, self.policy.level, reason, **times))
                continue
            finish = [self.engine.predict_finish(level, now, self.id) for level in range(self.policy.skip)]
            keeps_up = [self.engine.keeps_up(level) for level in range(self.policy.skip)]
            level, decision = self.policy.choose(c, self.t0 + ch.deadline_s(c), finish, self.engine.pending == 0,
                                                 keeps_up)
            if decision is not None:
                self._publish_decision(decision)
            skip = level == self.policy.skip
            rec = ChunkRecord(c, "skipped" if skip else "speech", level, jobs_queued=self.engine.pending, **times)
            if skip:
                self._idle_chunk(rec)
                continue
            start, stop = ch.window(c)  # the look-ahead not yet arrived is zeros
            window = self.audio.window(start, stop)
            with self._lock:
                self.chunks[c] = self.generating[c] = rec  # before submitting: the worker may finish it at once
            idle_motion, self.idle_motion = self.idle_motion, None
            self.engine.submit(Job(self.id, self.avatar, window, level, idle_motion,
                                   lambda frames, info, c=c: self._done(c, frames, info),
                                   lambda frames, ready, c=c: self._first(c, frames, ready)))

    def _idle_chunk(self, rec: ChunkRecord):
        """The chunk shows the idle loop; the next generated chunk continues from those idle frames."""
        with self._lock:
            self.chunks[rec.chunk] = rec
        self.idle_motion = (rec.chunk + 1) * self.W

    def _publish_decision(self, d: Decision):
        names = self.engine.level_names + ["idle chunks"]
        self.publish("decision", action=d.action, level=d.level, level_name=names[d.level], reason=d.reason)

    def _first(self, c, frames, ready):
        """Worker thread: chunk c's first frame is decoded (monotonic time `ready`); the rest follow."""
        with self._lock:
            rec = self.generating.get(c)
            if rec is not None:
                rec.first_ready_ms = round(self.clock_ms(ready), 1)
            self._put(c, 0, frames)

    def _put(self, c, first, frames):
        """Frames [first, first + len(frames)) of chunk c are ready (under the lock); those already due count
        as dropped_late."""
        for k, rgb in enumerate(frames):
            i = c * self.W + first + k
            if i >= self.play_index:
                self.ready[i] = rgb
            else:
                self.counts["dropped_late"] += 1

    def _done(self, c, frames, info):
        """Worker thread: chunk c finished (frames None on error; else from info["first"] on)."""
        with self._lock:
            rec = self.generating.pop(c, None)
            if frames is None:
                self.counts["errors"] += 1
                if rec is not None:
                    rec.kind, rec.error = "error", info.get("error")
            else:
                if rec is not None:
                    rec.gen_start_ms = round(self.clock_ms(info["gen_start"]), 1)
                    rec.gen_end_ms = round(self.clock_ms(info["gen_end"]), 1)
                    rec.gen_ms = round((info["gen_end"] - info["gen_start"]) * 1000, 1)
                    rec.decode_ms = round(info["decode_ms"], 1) if "decode_ms" in info else None
                    rec.computed_steps, rec.reused_steps = info["computed_steps"], info["reused_steps"]
                    rec.batch = info.get("batch", 1)
                    rec.level = info.get("level", rec.level)  # a batch runs at the highest level in it
                self._put(c, info.get("first", 0), frames)
        if self._loop is not None and not self.closed:  # room in the queue: form waiting chunks
            self._loop.call_soon_threadsafe(self._form_chunks)
            self._loop.call_soon_threadsafe(self._publish_chunks)  # its record may be waiting for its timings

    # ------------------------------------------------------------------------------ frames out
    async def frames(self):
        """Yield a Frame every 40 ms of the session clock, from frame 0 at t0 + playout delay."""
        self._loop = self._loop or asyncio.get_running_loop()
        self.monitor.start()
        if self.idle is None:  # first session of this avatar: the worker makes its idle loop (~1-2 s), the
            self._idle_task = asyncio.ensure_future(self._fetch_idle())  # portrait stands in until then
        try:
            while not self.closed:
                i = self.play_index
                # t0 may move while frame 0 waits (the first audio arrives): wait for the frame's time again
                while (wait := self.t0 + self.delay_s + i * FRAME_S - self.clock()) > 0 and not self.closed:
                    await asyncio.sleep(wait)
                if not self._t0_fixed:  # no audio before frame 0 was due: the session's start stays zero
                    self._start_clock(self.t0)
                frame = self._next_frame(i)
                yield frame
        finally:
            self.monitor.stop()

    async def _fetch_idle(self):
        self.idle = await self.engine.idle_loop_async(self.avatar)

    def _next_frame(self, i) -> Frame:
        c = i // self.W
        with self._lock:
            rgb = self.ready.pop(i, None)
            rec = self.chunks.get(c)
            self.play_index = i + 1
        kind = frame_kind(rec, rgb is not None)
        if rgb is None:
            rgb = self.idle.frame(i) if self.idle is not None else self.portrait
        self.counts["frames_out"] += 1
        self.counts[f"{kind}_frames"] += 1
        now = self.clock()
        frame = Frame(i, rgb, self.audio.window(i * SAMPLES_PER_FRAME, (i + 1) * SAMPLES_PER_FRAME), kind,
                      round(self.clock_ms(now), 1))
        if rec is not None:
            if i % self.W == 0:
                rec.send_ms = frame.t_ms
            if kind == "late":
                rec.late_frames = (rec.late_frames or 0) + 1
        if i % self.W == self.W - 1:
            self._chunk_out(c)
        if now - self._sec["t"] >= 1.0:
            self._second(now)
        # keep only the input audio that frames or chunks still to come can need
        self.audio.trim(min(i * SAMPLES_PER_FRAME, self.chunker.window(self.next_chunk)[0]))
        return frame

    def mark_sent(self, track: str, index: int, t: float | None = None) -> None:
        """A transport reports when it sent frame `index` ("video") or its audio ("audio")."""
        d = self._sent[track]
        d[index] = self.clock() if t is None else t
        if len(d) > 500:
            for k in sorted(d)[:250]:
                del d[k]

    def _chunk_out(self, c):
        """Publish chunk c's record once its last frame went out."""
        with self._lock:
            rec = self.chunks.pop(c, None)
            for k in [k for k in self.chunks if k < c]:  # never leak records of chunks never formed
                del self.chunks[k]
        if rec is None:
            rec = ChunkRecord(c, "missing", reason="its audio had not arrived")
        first = c * self.W
        rec.finish(self.W, self.live.transport_ms, self._sent["video"].get(first), self._sent["audio"].get(first))
        with self._lock:
            rec.ready_frames = len(self.ready)
        if rec.jobs_queued is None:
            rec.jobs_queued = self.engine.pending
        with self._lock:
            self._outbox.append(rec)
        self._publish_chunks()

    def _publish_chunks(self, everything: bool = False):
        """Publish the records whose last frame went out, in chunk order, each once its chunk's generation has
        ended (everything: all of them now, as they are, when the session ends). A chunk whose generation never
        ends (a worker that lost it) holds the others back for at most MAX_HELD_CHUNKS chunks."""
        while True:
            with self._lock:
                if not self._outbox or (not everything and self._outbox[0].chunk in self.generating
                                        and len(self._outbox) <= MAX_HELD_CHUNKS):
                    return
                rec = self._outbox.popleft()
                if rec.chunk in self.generating:
                    rec.reason = rec.reason or ("the session ended during its generation" if everything
                                                else f"its generation outlasted {MAX_HELD_CHUNKS} later chunks")
            self.publish("chunk", **rec.message())

    def _second(self, now):
        s = self._sec
        dt = now - s["t"]
        if self._procstats is None:
            self._procstats = ProcessStats(self.engine.worker_pids())
        proc = self._procstats.read()
        self.publish("second", fps_in=round((self.counts["samples_in"] - s["samples_in"]) / SAMPLES_PER_FRAME / dt, 2),
                     fps_out=round((self.counts["frames_out"] - s["frames_out"]) / dt, 2),
                     drops=self.counts["late_frames"] - s["late_frames"], late_frames=self.counts["late_frames"],
                     dropped_late=self.counts["dropped_late"], gap_fill_ms=round(self.audio.gap_samples / 16, 1),
                     loop_lag_max_ms=self.monitor.take(), level=self.level, jobs_in_flight=self.in_flight,
                     ready_frames=len(self.ready), cpu_percent=proc["cpu_percent"], rss_mb=proc["rss_mb"],
                     threads=proc["threads"], open_files=proc["open_files"])
        self._sec = {"t": now, "frames_out": self.counts["frames_out"], "samples_in": self.counts["samples_in"],
                     "late_frames": self.counts["late_frames"]}

    def stats(self) -> dict:
        return dict(self.counts, level=self.level, clock_ms=round(self.clock_ms(), 1))

    def close(self):
        """Stop: frames() ends, queued chunks are dropped when they finish."""
        if not self.closed:
            self.closed = True
            self.engine.end_session(self.id)
            self._publish_chunks(everything=True)
            self.publish("session", event="end", **self.stats())
