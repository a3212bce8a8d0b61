"""One live session: audio in (push_audio) -> chunker -> shared generation worker -> paced frames out.

The embedding API for presenter software; the WebRTC server is built on it:

    session = Session(engine, avatar="0")
    session.push_audio(pcm, 48000)          # from the event loop, in real time, any rate / channels
    async for frame in session.frames():    # 25 fps, paced by the session clock, never stalls
        show(frame.rgb); play(frame.audio)  # frame.audio: the speech of this frame, 16 kHz

One clock: sample n of the input is "captured" at t0 + n / 16000 (t0 = session start; network gaps
are filled with silence so the input keeps pace), and frame i goes out at t0 + D + i / 25 with the
input audio of that same frame, so sound and picture cannot drift apart. D is `playout_delay_ms`.

Backpressure: before queueing a speech chunk the policy predicts when it would be ready; if that misses
the chunk's deadline it first raises the cache ratio (level 1), and if that is still late it turns the
chunk idle (level 2 = skip). After `recover_chunks` chunks on time it steps back down. Every decision is
published to telemetry. The queue holds at most `max_ahead_chunks` chunks, so latency stays bounded.
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np

from engine.model.audio_encoder import MARGIN_FRAMES
from streaming.audio_in import FRAME_SAMPLES, SAMPLE_RATE, AudioInput
from engine.data.portraits import canonical_avatar
from engine.generator import load_avatar
from streaming.engine import Engine, Job
from streaming.telemetry import Telemetry

FPS = 25
FRAME_S = 1 / FPS


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
    """Measures how late the event loop wakes a 10 ms timer: the longest block in each interval."""

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
    """A live avatar session; see the module docstring. push_audio / frames / close from one event loop."""

    def __init__(self, engine: Engine, avatar: str = "0", session_id: str | None = None,
                 telemetry: Telemetry | None = None):
        self.engine, self.avatar = engine, canonical_avatar(avatar)  # ValueError for an unknown avatar
        self.id = session_id or uuid.uuid4().hex[:12]
        self.live = engine.config.live
        self.telemetry = telemetry or Telemetry(None)
        self.portrait = load_avatar(self.avatar).rgb  # ValueError for an unknown avatar, before anything starts
        self.cfg = engine.cfg
        self.W = self.cfg.frames
        self.audio = AudioInput(self.live.vad_mode)
        self.delay_s = self.live.playout_delay_ms / 1000
        self.t0 = time.monotonic()
        self.closed = False
        self._lock = threading.Lock()  # ready frames and chunk records are written by the worker thread
        self.ready: dict[int, np.ndarray] = {}  # frame index -> rgb
        self.chunks: dict[int, dict] = {}  # chunk -> telemetry record
        self.next_chunk = 0  # next chunk to form
        self.play_index = 0  # next frame to go out
        self.in_flight = 0  # this session's chunks queued or generating
        self.level = 0  # 0: default cache, 1: boost cache, 2: skip (turn chunks idle)
        self.on_time = 0
        self.idle_motion = None  # after idle chunks: the next generated chunk continues from idle frames
        self.arrivals: list[tuple[int, float]] = []  # (input end sample, monotonic arrival)
        self.counts = {"frames_out": 0, "late_frames": 0, "idle_frames": 0, "speech_frames": 0,
                       "samples_in": 0, "pushes": 0, "dropped_late": 0, "errors": 0}
        self._sec = {"t": self.t0, "frames_out": 0, "samples_in": 0, "late_frames": 0}
        self._sent = {"video": {}, "audio": {}}  # frame index -> monotonic send time (from the tracks)
        self._proc = None  # psutil handles (this process and the generation worker) for CPU / RSS
        self._loop = None
        self.monitor = LoopMonitor()
        self.idle = engine.ready_idle_loop(self.avatar)
        self.publish("session", event="start", avatar=self.avatar, playout_delay_ms=self.live.playout_delay_ms,
                     cache=engine.level_names[0])

    # ----------------------------------------------------------------------------------- clock
    def clock_ms(self, t: float | None = None) -> float:
        return ((time.monotonic() if t is None else t) - self.t0) * 1000

    def publish(self, type_, **fields):
        return self.telemetry.publish(self.id, type_, self.clock_ms(), **fields)

    # ------------------------------------------------------------------------------- audio in
    def push_audio(self, pcm, sample_rate: int) -> None:
        """Feed microphone audio (int16 or float32, [n] or [n, channels]) as it is captured."""
        if self.closed:
            raise RuntimeError(f"session {self.id} is closed")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        now = time.monotonic()
        pcm = np.asarray(pcm)
        n_in = round(len(pcm) * SAMPLE_RATE / sample_rate) if sample_rate else 0
        # the input must keep pace with the clock: before the first audio (connection set-up) and after a
        # network gap longer than gap_fill_ms, pad silence so that this push ends "now"
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
        """Monotonic time the given input sample arrived (None if before what is remembered)."""
        for end, t in self.arrivals:
            if end > sample:
                return t
        return None

    # -------------------------------------------------------------------------------- chunker
    def _needed(self, c: int) -> int:
        """Input samples that must have arrived before chunk c can be generated: `lookahead_wait` frames
        of its look-ahead (at most the model's); what comes after is zeros in the window.

        The audio encoder's extra margin frame after the look-ahead is never waited for: on 8 dev clips
        sync_conf was 0.754 without it vs 0.750 with it, and it would cost 40 ms of latency.
        """
        wait = min(self.live.lookahead_wait, self.cfg.lookahead)
        return ((c + 1) * self.W + wait) * FRAME_SAMPLES

    def _form_chunks(self):
        cfg, W = self.cfg, self.W
        while (not self.closed and self.audio.end >= self._needed(self.next_chunk)
               and self.in_flight < self.live.max_ahead_chunks):
            c = self.next_chunk
            self.next_chunk += 1
            now = time.monotonic()
            first = c * W
            rec = {"chunk": c, "capture_ms": None, "ready_ms": round(self.clock_ms(now), 1),
                   "deadline_ms": round((self.delay_s + first * FRAME_S) * 1000, 1)}
            arr = self._arrival(first * FRAME_SAMPLES)
            rec["capture_ms"] = round(self.clock_ms(arr), 1) if arr is not None else None
            if first * FRAME_S + self.delay_s < now - self.t0:  # its frames are already gone (input late)
                rec |= {"kind": "late", "level": self.level, "reason": "input arrived after the deadline"}
                self._idle_chunk(c, rec)
                continue
            hang = int(np.ceil(self.live.hangover_ms / 40))
            lo = max(0, first - hang)
            speech = self.audio.speech_frames(lo, first + W + cfg.lookahead - lo).any()
            if not speech:
                rec |= {"kind": "idle", "level": self.level}
                self._idle_chunk(c, rec)
                continue
            level = self._policy(c, now)
            rec |= {"kind": "speech" if level < 2 else "skipped", "level": level,
                    "jobs_queued": self.engine.pending}
            if level == 2:
                self._idle_chunk(c, rec)
                continue
            start = (first - cfg.lookback - MARGIN_FRAMES) * FRAME_SAMPLES
            stop = ((c + 1) * W + cfg.lookahead + MARGIN_FRAMES) * FRAME_SAMPLES  # not yet arrived: zeros
            window = self.audio.window(start, stop)
            self.in_flight += 1
            idle_motion, self.idle_motion = self.idle_motion, None
            self.engine.submit(Job(self.id, self.avatar, window, level, idle_motion,
                                   lambda frames, info, c=c: self._done(c, frames, info)))
            with self._lock:
                self.chunks[c] = rec

    def _idle_chunk(self, c, rec):
        """Chunk c shows the idle loop; the next generated chunk continues from those idle frames."""
        with self._lock:
            self.chunks[c] = rec
        self.idle_motion = (c + 1) * self.W

    def _policy(self, c, now) -> int:
        """Cache level for speech chunk c: raise it when the chunk would miss its deadline, else recover."""
        deadline = self.t0 + self.delay_s + c * self.W * FRAME_S - self.live.safety_ms / 1000
        def finish(level):
            return self.engine.predict_finish(min(level, 1), now)

        level = self.level
        if level < 2 and finish(level) > deadline:
            while level < 2 and finish(level) > deadline:
                level += 1
            if level == 2 and self.engine.pending == 0:
                level = 1  # an idle worker generates anyway (late frames show idle): estimates stay fresh
            self._decide("raise", level, f"chunk {c} predicted {1000 * (finish(self.level) - deadline):.0f} ms late")
            self.on_time = 0
        elif level > 0:
            self.on_time += 1
            if self.on_time >= self.live.recover_chunks and finish(level - 1) <= deadline:
                level -= 1
                self._decide("lower", level, f"{self.on_time} chunks on time")
                self.on_time = 0
        if level == 2:  # skipping is per chunk: try the boost level again for the next one
            self.level = 1
        else:
            self.level = level
        return level

    def _decide(self, action, level, reason):
        names = self.engine.level_names + ["idle chunks"]
        self.publish("decision", action=action, level=level, level_name=names[level], reason=reason)

    def _done(self, c, frames, info):
        """Worker thread: chunk c finished (frames None on error)."""
        with self._lock:
            self.in_flight -= 1
            rec = self.chunks.get(c, {})
            if frames is None:
                self.counts["errors"] += 1
                rec |= {"kind": "error", "error": info.get("error")}
            else:
                rec |= {"gen_start_ms": round(self.clock_ms(info["gen_start"]), 1),
                        "gen_end_ms": round(self.clock_ms(info["gen_end"]), 1),
                        "gen_ms": round((info["gen_end"] - info["gen_start"]) * 1000, 1),
                        "computed_steps": info["computed_steps"], "reused_steps": info["reused_steps"]}
                for k, rgb in enumerate(frames):
                    i = c * self.W + k
                    if i >= self.play_index:
                        self.ready[i] = rgb
                    else:
                        self.counts["dropped_late"] += 1
        if self._loop is not None and not self.closed:  # room in the queue: form waiting chunks
            self._loop.call_soon_threadsafe(self._form_chunks)

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
                target = self.t0 + self.delay_s + i * FRAME_S
                wait = target - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
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
        if rgb is not None:
            kind = "speech"
        else:
            planned = rec.get("kind") if rec else None
            kind = "late" if planned in ("speech", "error") else "idle"
            rgb = self.idle.frame(i) if self.idle is not None else self.portrait
        self.counts["frames_out"] += 1
        self.counts[f"{kind}_frames"] += 1
        now = time.monotonic()
        frame = Frame(i, rgb, self.audio.window(i * FRAME_SAMPLES, (i + 1) * FRAME_SAMPLES), kind,
                      round(self.clock_ms(now), 1))
        if rec is not None:
            if i % self.W == 0:
                rec["send_ms"] = frame.t_ms
            if kind == "late":
                rec["late_frames"] = rec.get("late_frames", 0) + 1
        if i % self.W == self.W - 1:
            self._chunk_out(c)
        if now - self._sec["t"] >= 1.0:
            self._second(now)
        # keep only the input audio that frames or chunks still to come can need
        self.audio.trim(min(i, self.next_chunk * self.W - self.cfg.lookback - MARGIN_FRAMES) * FRAME_SAMPLES)
        return frame

    def mark_sent(self, track: str, index: int, t: float | None = None) -> None:
        """A transport reports when it sent frame `index` ("video") or its audio ("audio")."""
        d = self._sent[track]
        d[index] = time.monotonic() if t is None else t
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
            rec = {"chunk": c, "kind": "missing", "reason": "its audio had not arrived"}
        if rec.get("kind") == "speech" and rec.get("late_frames", 0) == self.W:
            rec["kind"] = "late"  # generated, but none of its frames in time: the idle loop was shown
        first = c * self.W
        v, a = self._sent["video"].get(first), self._sent["audio"].get(first)
        rec["av_offset_ms"] = round((a - v) * 1000, 1) if v is not None and a is not None else 0.0
        if rec.get("capture_ms") is not None and rec.get("send_ms") is not None:
            rec["latency_est_ms"] = round(rec["send_ms"] - rec["capture_ms"] + self.live.transport_ms, 1)
        with self._lock:
            rec["ready_frames"] = len(self.ready)
        rec["jobs_queued"] = rec.get("jobs_queued", self.engine.pending)
        self.publish("chunk", **rec)

    def _cpu_rss(self):
        """CPU percent (of one core) and RSS in MB of the server process plus the generation worker."""
        import psutil
        if self._proc is None:
            self._proc = [psutil.Process()] + [psutil.Process(p) for p in self.engine.worker_pids()]
            for p in self._proc:
                p.cpu_percent()  # the first reading is always 0: prime it
        cpu = rss = 0.0
        for p in self._proc:
            try:
                cpu += p.cpu_percent()
                rss += p.memory_info().rss
            except psutil.Error:
                pass
        return round(cpu, 1), round(rss / 2**20, 1)

    def _second(self, now):
        s = self._sec
        dt = now - s["t"]
        cpu, rss = self._cpu_rss()
        self.publish("second", fps_in=round((self.counts["samples_in"] - s["samples_in"]) / FRAME_SAMPLES / dt, 2),
                     fps_out=round((self.counts["frames_out"] - s["frames_out"]) / dt, 2),
                     drops=self.counts["late_frames"] - s["late_frames"], late_frames=self.counts["late_frames"],
                     dropped_late=self.counts["dropped_late"], gap_fill_ms=round(self.audio.gap_samples / 16, 1),
                     loop_lag_max_ms=self.monitor.take(), level=self.level, jobs_in_flight=self.in_flight,
                     ready_frames=len(self.ready), cpu_percent=cpu, rss_mb=rss)
        self._sec = {"t": now, "frames_out": self.counts["frames_out"], "samples_in": self.counts["samples_in"],
                     "late_frames": self.counts["late_frames"]}

    def stats(self) -> dict:
        return dict(self.counts, level=self.level, clock_ms=round(self.clock_ms(), 1))

    def close(self):
        """Stop: frames() ends, queued chunks are dropped when they finish."""
        if not self.closed:
            self.closed = True
            self.engine.end_session(self.id)
            self.publish("session", event="end", **self.stats())
