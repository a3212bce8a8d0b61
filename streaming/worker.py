"""The generation worker, the server's side: one process shared by all sessions, and idle loops per avatar.

`GenerationWorker` (in the server process) starts the worker process (streaming/worker_process.py) and
talks to it in typed messages over two queues (streaming/protocol.py). It predicts when a chunk's first
frame would be ready at each level (the backpressure policy's input), admits sessions by the measured
batch times (`sessions_supported`), and hands each chunk's frames to its session's callbacks as they come.
"""
from __future__ import annotations

import asyncio
import collections
import multiprocessing as mp
import threading
from dataclasses import dataclass

import numpy as np

from engine.audio import SAMPLE_RATE, SAMPLES_PER_FRAME
from engine.config import Config
from streaming.protocol import (ACTIVE_S, ChunkDone, ChunkRequest, DitDone, EndSession,
                                FirstFrame, ForgetIdle, IdleDone, IdleRequest, Ready, every_frame_ms, ping_pong, rest_share)
from streaming.worker_process import main as worker_main

# a round of chunks may fill at most this share of a chunk period: two sessions forced in, whose batch of two
# took 86-97% of the period (137-155 ms per 160), had 37% and 22% of their chunks skipped
# (docs/live/two_sessions_480.json): WebRTC, the clients and jitter need the rest of these 2 cores
HEADROOM = 0.85


@dataclass
class IdleLoop:
    """Model-made frames of one avatar listening in silence, shown at frame i as frames[ping_pong(i)]."""
    frames: np.ndarray  # uint8 [L, 128, 128, 3]

    def frame(self, i: int) -> np.ndarray:
        return self.frames[ping_pong(i, len(self.frames))]


@dataclass
class Job:
    """One chunk of one session to generate. On the engine's reader thread: `early(frames, ready)` with the
    chunk's first frame as soon as it is decoded, then `done(frames | None, info)` with the frames after it
    (info["first"]: the index of frames[0] in the chunk). Without `early`, done gets all the frames."""
    session: str
    avatar: str
    window: np.ndarray  # float32 16 kHz audio of the chunk with its look-back / look-ahead context
    level: int
    idle_motion: int | None  # continue from the idle frames shown before global frame idle_motion
    done: callable
    early: callable = None


def _model_config(config: Config):
    """The DiT config from the weights' metadata (no model load in the server process)."""
    import json

    from safetensors import safe_open

    from engine.model.avatar import _tuples
    from engine.model.dit import DiTConfig
    path = config.path(config.model.weights)
    if not path.exists():
        raise FileNotFoundError(f"model weights not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return DiTConfig(**_tuples(json.loads(meta["dit"]))) if "dit" in meta else DiTConfig()


class GenerationWorker:
    """Shared generation worker. `submit(job)` from any thread; `idle_loop_async(avatar)` is cached."""

    def __init__(self, config: Config, ready_timeout_s: float = 120):
        self.config = config
        self.cfg = _model_config(config)
        self.level_names = [lvl.name() for lvl in config.live.levels]  # per level, for telemetry
        self.pending = 0  # chunks queued or generating, all sessions
        self._grid0 = None  # monotonic time of the shared chunk grid's origin (aligned_start)
        self._speaking = {}  # session -> last time it asked when a speech chunk would be ready
        self._lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self._heads: dict[int, np.ndarray] = {}  # first frames held for jobs without an `early` callback
        self._decoding: dict[int, tuple[float, int]] = {}  # job past its DiT -> (when it ended, its batch size)
        self._next_id = 0
        self._idle: collections.OrderedDict[str, IdleLoop] = collections.OrderedDict()  # least recently used first
        self.max_idle_loops = max(1, config.server.idle_loops)
        self._idle_wait: dict[str, list] = {}
        ctx = mp.get_context("spawn")  # no fork of a process with threads / an event loop
        self._in, self._out = ctx.Queue(), ctx.Queue()
        self._proc = ctx.Process(target=worker_main, args=(config, self._in, self._out), daemon=True,
                                 name="syncavatar-generate")
        self._proc.start()
        msg = self._out.get(timeout=ready_timeout_s)
        if not isinstance(msg, Ready):
            raise RuntimeError(f"generation worker failed to start: {getattr(msg, 'error', msg)}")
        self.gen_ms = list(msg.gen_ms)  # measured at start-up, then a running mean of live chunks
        self.precision = msg.precision  # what the worker generates in: "bf16" or "fp32" (auto: the faster here)
        self.audio_backend = msg.audio_backend  # the audio path's backend (auto: the fastest timed here)
        self.audio_backend_ms = msg.audio_backend_ms or {}
        # per level, ms of the DiT stage of a batch of B chunks (index B - 1); per B, decoding all frames and
        # the chunks' first frames: measured at start-up, then running means of live batches
        self.dit_ms = [list(d) for d in msg.dit_ms]
        self.decode_ms = list(msg.decode_ms or [0.0])
        self.first_ms = list(msg.first_ms or [0.0])
        # per level, its decoder's cost against the model's own ([[live.levels]] decoder), measured at start-up
        self.decode_scale = list(msg.decode_scale or [1.0] * len(self.dit_ms))
        self.pipelined = msg.pipelined
        self.closed = False
        self._reader = threading.Thread(target=self._read, name="syncavatar-results", daemon=True)
        self._reader.start()

    # --------------------------------------------------------------------------- sessions' side
    def submit(self, job: Job) -> None:
        with self._lock:
            jid = self._next_id
            self._next_id += 1
            self._jobs[jid] = job
            self.pending += 1
        self._in.put(ChunkRequest(jid, job.session, job.avatar, job.window, job.level, job.idle_motion))

    def chunk_ms(self) -> float:
        """Speech one chunk covers (160 ms), the period of every session's chunks."""
        return self.cfg.frames * SAMPLES_PER_FRAME * 1000 / SAMPLE_RATE

    def aligned_start(self, now: float) -> float:
        """A new session's clock zero: the latest point of the shared chunk grid at or before `now`, so
        that every session's chunks fall due together and the worker can denoise them as one batch (the
        session starts with up to one chunk of silence it never heard)."""
        period = self.chunk_ms() / 1000
        with self._lock:
            if self._grid0 is None:
                self._grid0 = now
            return now - (now - self._grid0) % period

    def predict_finish(self, level: int, now: float, session: str | None = None) -> float:
        """When the first frame of a chunk of `session` submitted now at this level would be ready
        (monotonic seconds; it is the frame due first).

        The worker runs rounds of batches with one chunk per session: the chunk waits for as many rounds
        as its session has chunks pending (first_frame_ms). Every session that is speaking now (asked for
        a prediction within ACTIVE_S) counts in this round even before its chunk arrives: the worker waits
        for it (gather), so every session predicts the same round and all take the same decision, none
        starving because it asked second."""
        with self._lock:
            per = collections.Counter(j.session for k, j in self._jobs.items() if k not in self._decoding)
            busy = self._decode_backlog_ms(now)
            if session is not None:
                self._speaking[session] = now
            for other, t in list(self._speaking.items()):
                if now - t > ACTIVE_S:
                    del self._speaking[other]
                elif other != session and other not in per:
                    per[other] = 1
        per[session] += 1
        rounds = [sum(c > r for c in per.values()) for r in range(per[session])]  # sessions in each round
        return now + self.first_frame_ms(level, rounds, busy) / 1000

    def keeps_up(self, level: int) -> bool:
        """Whether the worker can generate at this level chunk after chunk: a round of one chunk per
        speaking session holds it at most one chunk period (the backpressure policy leaves a level that
        cannot, even when one chunk there would be on time)."""
        with self._lock:
            n = max(1, len(self._speaking))
        return self.batch_estimate_ms(level, n) <= self.chunk_ms()

    def _decode_backlog_ms(self, now: float) -> float:
        """ms until the decoder is done with the batches already past their DiT (DitDone): each decoded from
        the later of its DiT's end and the previous batch's decode, one after another."""
        end = now
        for k, (at, b, level) in enumerate(sorted(set(self._decoding.values()))):
            end = (at if k == 0 else max(end, at)) + self.decode_est_ms(level, b) / 1000
        return max(0.0, end - now) * 1000

    def _rest_share(self, level: int) -> float:
        return rest_share(self.cfg.frames, self.config.live.levels[level].decode_every)

    def decode_est_ms(self, level: int, b: int) -> float:
        """ms to decode a batch of b chunks at this level: the first frames, then the share of the other
        frames the level decodes ([[live.levels]] decode_every) of what decoding them all takes, both with
        the level's decoder (decode_scale)."""
        first = self._per_b(self.first_ms, b)
        return (first + (self._per_b(self.decode_ms, b) - first) * self._rest_share(level)) * self.decode_scale[level]

    def first_est_ms(self, level: int, b: int) -> float:
        """ms to decode the first frames of a batch of b chunks at this level (its decoder)."""
        return self._per_b(self.first_ms, b) * self.decode_scale[level]

    def first_frame_ms(self, level: int, rounds: list, busy_ms: float = 0.0) -> float:
        """ms from now until the first frames of the last of these rounds (sizes: chunks in each, not yet
        denoised) are decoded; the decoder is busy for busy_ms with batches already denoised.

        In sequence a batch runs its DiT stage, then decodes (first frames first). Pipelined, a batch's
        DiT starts when the previous batch's DiT ends, and its decoding once that DiT has ended and the
        decode thread is free: a chunk's first frame waits for its own DiT and, where decoding is the slower
        stage (slow CPUs), for the batches decoded before it, not for a whole round of the slower stage."""
        batches = [b for size in rounds for b in self._batches(level, size)]
        dit_end, dec_end = 0.0, busy_ms
        for i, b in enumerate(batches):
            dit, dec, first = self.dit_ms[level][b - 1], self.decode_est_ms(level, b), self.first_est_ms(level, b)
            dit_end = (dit_end if self.pipelined else dec_end) + dit
            start = max(dit_end, dec_end)
            if i == len(batches) - 1:
                return start + first
            dec_end = start + dec
        return 0.0

    @staticmethod
    def _per_b(ms: list, b: int) -> float:
        """A decoding time measured per batch size, for b chunks (the largest measured past its end)."""
        return ms[min(b, len(ms)) - 1]

    def _batches(self, level: int, size: int) -> list:
        """A round of `size` chunks as the worker runs it: batches of at most the level's batch size."""
        most = len(self.dit_ms[level])
        full, rest = divmod(size, most)
        return [most] * full + ([rest] if rest else [])

    def hold_ms(self, level: int, b: int) -> float:
        """ms a batch of b chunks holds the worker: its slower stage when decoding is pipelined (the next
        batch's DiT runs beside its decoding), both stages when not."""
        dit, dec = self.dit_ms[level][b - 1], self.decode_est_ms(level, b)
        return max(dit, dec) if self.pipelined else dit + dec

    @property
    def batch_ms(self) -> list:
        """Per level, ms a batch of B = 1, 2, ... chunks holds the worker (hold_ms)."""
        return [[self.hold_ms(lvl, b) for b in range(1, len(d) + 1)] for lvl, d in enumerate(self.dit_ms)]

    def batch_estimate_ms(self, level: int, size: int) -> float:
        """ms one round of `size` chunks holds the worker (batches of at most the level's batch size)."""
        return sum(self.hold_ms(level, b) for b in self._batches(level, size))

    def sessions_supported(self, slack_ms: float) -> tuple[int, int | None, float]:
        """(how many speaking sessions this worker serves on time, the level that does it, the ms its round
        of one chunk per session holds the worker there): a round must fit HEADROOM of a chunk period and
        its first frames, with the batch wait, the slack between a chunk's audio arriving and its first
        frame going out (latency). (0, None, ms) when not even one session fits (a CPU slower than real time)."""
        period, slack = HEADROOM * self.chunk_ms(), slack_ms - self.config.live.batch_wait_ms
        best = (0, None, self.batch_estimate_ms(0, 1))
        for n in range(1, 65):
            fits = [lvl for lvl in range(len(self.dit_ms)) if self.batch_estimate_ms(lvl, n) <= period
                    and self.first_frame_ms(lvl, [n]) <= slack]
            if not fits:
                break
            best = (n, fits[0], self.batch_estimate_ms(fits[0], n))
        return best

    def end_session(self, session: str) -> None:
        """Free the worker's state (motion latents, noise) of a session."""
        with self._lock:
            self._speaking.pop(session, None)
        if not self.closed:
            self._in.put(EndSession(session))

    def worker_pids(self) -> list[int]:
        return [self._proc.pid] if self._proc.is_alive() else []

    def estimate_ms(self, level: int) -> float:
        """Expected generation time of one chunk at a cache level (measured at start-up, then live)."""
        return self.gen_ms[level]

    def idle_loop(self, avatar: str, timeout_s: float = 120) -> IdleLoop:
        """The avatar's idle loop, made on the worker on first use (blocks the caller until then)."""
        avatar = str(avatar)
        loop = self._idle.get(avatar)
        if loop is None:
            ev, made = threading.Event(), []

            def wake(result):  # the loop itself: the cache may drop it before this thread looks
                made.append(result)
                ev.set()
            with self._lock:
                first = avatar not in self._idle_wait
                self._idle_wait.setdefault(avatar, []).append(wake)
            if first:
                self._in.put(IdleRequest(avatar))
            if not ev.wait(timeout_s) or made[0] is None:
                raise RuntimeError(f"could not make the idle loop of avatar {avatar}")
            loop = made[0]
        return loop

    def idle_loops_cached(self) -> int:
        return len(self._idle)

    def ready_idle_loop(self, avatar: str) -> IdleLoop | None:
        """The avatar's idle loop if it has been made already (never blocks)."""
        loop = self._idle.get(str(avatar))
        if loop is not None:
            self._idle.move_to_end(str(avatar))
        return loop

    async def idle_loop_async(self, avatar: str) -> IdleLoop:
        if str(avatar) in self._idle:
            return self.ready_idle_loop(avatar)
        return await asyncio.get_running_loop().run_in_executor(None, self.idle_loop, avatar)

    def _keep_idle_loop(self, avatar: str, loop: IdleLoop) -> None:
        """Cache an idle loop; past `[server] idle_loops` the least recently used one (never the default
        avatar's) is dropped here and in the worker (sessions showing it keep their own reference)."""
        self._idle[avatar] = loop
        self._idle.move_to_end(avatar)
        while len(self._idle) > self.max_idle_loops:
            old = next((a for a in self._idle if a != self.config.engine.avatar), None)
            if old is None or old == avatar:
                break
            del self._idle[old]
            self._in.put(ForgetIdle(old))

    def _read(self):
        while True:
            try:
                msg = self._out.get()
            except (EOFError, OSError):
                return
            if msg is None:
                return
            if isinstance(msg, DitDone):
                with self._lock:
                    for job in msg.jobs:
                        self._decoding[job] = (msg.at, len(msg.jobs), msg.level)
            elif isinstance(msg, FirstFrame):
                with self._lock:
                    job = self._jobs.get(msg.job)
                if job.early is not None:
                    job.early(msg.frames, msg.ready)
                else:
                    self._heads[msg.job] = msg.frames
            elif isinstance(msg, ChunkDone):
                if msg.frames is not None and msg.info.get("batch_index", 0) == 0:  # once per batch
                    self._learn(msg.info)
                with self._lock:
                    job = self._jobs.pop(msg.job)
                    self._decoding.pop(msg.job, None)
                    self.pending -= 1
                head, frames, first = self._heads.pop(msg.job, None), msg.frames, msg.first
                if head is not None and frames is not None:
                    frames, first = np.concatenate([head, frames]), 0
                job.done(frames, msg.info | {"first": first})
            elif isinstance(msg, IdleDone):
                loop = None if msg.frames is None else IdleLoop(msg.frames)
                if loop is not None:
                    self._keep_idle_loop(msg.avatar, loop)
                with self._lock:
                    waiters = self._idle_wait.pop(msg.avatar, [])
                for fn in waiters:
                    fn(loop)

    def _learn(self, info: dict) -> None:
        """Running means of the measured times of a finished batch (alone: its latency as gen_ms); decoding
        as what decoding every frame with the model's decoder would have taken (decode_est_ms scales it back
        per level), or at a level with a decoder of its own, what that decoder costs against it (decode_scale)."""
        lvl, n, dit, dec = info["level"], info.get("batch", 1), info["dit_ms"], info["decode_ms"]
        own = bool(self.config.live.levels[lvl].decoder)
        if n == 1:
            prev = self.gen_ms[lvl]
            self.gen_ms[lvl] = dit + dec if prev is None else 0.8 * prev + 0.2 * (dit + dec)
        if n <= len(self.dit_ms[lvl]):
            self.dit_ms[lvl][n - 1] = 0.8 * self.dit_ms[lvl][n - 1] + 0.2 * dit
        share = self._rest_share(lvl)
        if n > len(self.decode_ms):
            return
        if own:  # its decode as every frame would take, against the model's decoder's estimate for the batch
            every = every_frame_ms(dec, info["first_ms"], share) if share > 0 else info["first_ms"]
            base = self.decode_ms[n - 1] if share > 0 else self.first_ms[n - 1]
            if base > 0:
                self.decode_scale[lvl] = 0.8 * self.decode_scale[lvl] + 0.2 * every / base
            return
        self.first_ms[n - 1] = 0.8 * self.first_ms[n - 1] + 0.2 * info["first_ms"]
        if share > 0:  # a level that decodes only first frames says nothing of the rest
            every = every_frame_ms(dec, info["first_ms"], share)
            self.decode_ms[n - 1] = 0.8 * self.decode_ms[n - 1] + 0.2 * every

    def close(self):
        if self.closed:
            return
        self.closed = True
        self._in.put(None)
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.terminate()
        self._out.put(None)
        self._reader.join(timeout=5)
