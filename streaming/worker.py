"""The generation worker: one process shared by all sessions, and idle loops per avatar.

`GenerationWorker` (in the server process) owns the worker process and talks to it in typed messages
over two queues: ChunkRequest / IdleRequest / EndSession / ForgetIdle in, Ready / StartFailed /
ChunkDone / IdleDone out (None stops either side).

Generation runs in its own process, not a thread of the server: the event loop then never waits on the
GIL, and torch on this CPU is ~1.7x slower from a secondary thread than from a process's main thread
(measured: 187 vs 112 ms per chunk, interleaved in one process). The DiT and its cache hooks are not
re-entrant, so the worker serves every session's chunks first come first served.

The cache has levels for the backpressure policy: level 0 is the configured method (SyncCache's offline
schedule by default), level 1 the higher-ratio `boost_cache`; the worker re-attaches hooks when the level
changes, and resets the cache whenever the next chunk belongs to another session.
"""
from __future__ import annotations

import asyncio
import collections
import multiprocessing as mp
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from engine.config import Config

SAMPLES_PER_FRAME = 640


def ping_pong(i: int, n: int) -> int:
    """Index into an n-frame loop played forwards then backwards: 0..n-1, n-2..1, 0.. (never a jump)."""
    if n <= 1:
        return 0
    p = i % (2 * n - 2)
    return p if p < n else 2 * n - 2 - p


@dataclass
class IdleLoop:
    """Model-made frames of one avatar listening in silence, shown at frame i as frames[ping_pong(i)]."""
    frames: np.ndarray  # uint8 [L, 128, 128, 3]

    def frame(self, i: int) -> np.ndarray:
        return self.frames[ping_pong(i, len(self.frames))]


@dataclass
class Job:
    """One chunk of one session to generate; `done(frames | None, info)` runs on the engine's reader thread."""
    session: str
    avatar: str
    window: np.ndarray  # float32 16 kHz audio of the chunk with its look-back / look-ahead context
    level: int
    idle_motion: int | None  # continue from the idle frames shown before global frame idle_motion
    done: callable


# --- messages between the server and the worker process ----------------------------------------------
@dataclass
class ChunkRequest:
    job: int
    session: str
    avatar: str
    window: np.ndarray  # float32 16 kHz audio with look-back / look-ahead context
    level: int  # cache level
    idle_motion: int | None


@dataclass
class IdleRequest:
    avatar: str


@dataclass
class EndSession:
    session: str


@dataclass
class ForgetIdle:
    avatar: str  # an idle loop the server dropped from its cache


@dataclass
class Ready:
    gen_ms: list  # per cache level, measured at start-up
    precision: str  # "bf16" or "fp32"


@dataclass
class StartFailed:
    error: str


@dataclass
class ChunkDone:
    job: int
    frames: np.ndarray | None  # None: the chunk failed (info["error"])
    info: dict


@dataclass
class IdleDone:
    avatar: str
    frames: np.ndarray | None
    error: str | None


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
        self.level_names = [config.live.cache, config.live.boost_cache]
        self.pending = 0  # chunks queued or generating, all sessions
        self._free_at = 0.0  # predicted monotonic time the worker has finished every queued chunk
        self._lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self._next_id = 0
        self._idle: collections.OrderedDict[str, IdleLoop] = collections.OrderedDict()  # least recently used first
        self.max_idle_loops = max(1, config.server.idle_loops)
        self._idle_wait: dict[str, list] = {}
        ctx = mp.get_context("spawn")  # no fork of a process with threads / an event loop
        self._in, self._out = ctx.Queue(), ctx.Queue()
        self._proc = ctx.Process(target=_worker_main, args=(config, self._in, self._out), daemon=True,
                                 name="syncavatar-generate")
        self._proc.start()
        msg = self._out.get(timeout=ready_timeout_s)
        if not isinstance(msg, Ready):
            raise RuntimeError(f"generation worker failed to start: {getattr(msg, 'error', msg)}")
        self.gen_ms = list(msg.gen_ms)  # measured at start-up, then a running mean of live chunks
        self.precision = msg.precision  # what the worker generates in: "bf16" or "fp32" (auto: the faster here)
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
            self._free_at = max(time.monotonic(), self._free_at) + self.estimate_ms(job.level) / 1000
        self._in.put(ChunkRequest(jid, job.session, job.avatar, job.window, job.level, job.idle_motion))

    def predict_finish(self, level: int, now: float) -> float:
        """When a chunk submitted now at this cache level would be ready (monotonic seconds)."""
        with self._lock:
            return max(now, self._free_at) + self.estimate_ms(level) / 1000

    def end_session(self, session: str) -> None:
        """Free the worker's state (motion latents, noise) of a session."""
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
            if isinstance(msg, ChunkDone):
                if msg.frames is not None:
                    lvl, ms = msg.info["level"], msg.info["gen_ms"]
                    prev = self.gen_ms[lvl]
                    self.gen_ms[lvl] = ms if prev is None else 0.8 * prev + 0.2 * ms
                with self._lock:
                    job = self._jobs.pop(msg.job)
                    self.pending -= 1
                    # re-predict from what is still queued (the oldest of them is running now)
                    self._free_at = time.monotonic() + sum(self.estimate_ms(j.level) for j in self._jobs.values()) / 1000
                job.done(msg.frames, msg.info)
            elif isinstance(msg, IdleDone):
                loop = None if msg.frames is None else IdleLoop(msg.frames)
                if loop is not None:
                    self._keep_idle_loop(msg.avatar, loop)
                with self._lock:
                    waiters = self._idle_wait.pop(msg.avatar, [])
                for fn in waiters:
                    fn(loop)

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


# ------------------------------------------------------------------------------ worker process
class _Worker:
    """Lives in the worker process: the model, the attached cache level, per-session generators."""

    def __init__(self, config: Config):
        import torch

        from engine.model.audio_encoder import MARGIN_FRAMES
        from engine.model.avatar import load_model
        self.torch = torch
        if config.live.worker_threads > 0:
            torch.set_num_threads(config.live.worker_threads)
        self.config = config
        m, live = config.model, config.live
        self.model = load_model(config.path(m.weights))
        self.cfg = self.model.cfg
        self.offset = self.cfg.lookback + MARGIN_FRAMES  # chunk start inside a job's window, in frames
        self.levels = [self._cache(live.cache, live.schedule), self._cache(live.boost_cache, live.boost_schedule)]
        if live.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"[live] precision must be auto, bf16 or fp32, got {live.precision!r}")
        self.bf16 = live.precision == "bf16"  # "auto" is decided by _pick_precision at start-up
        self.handle, self.level, self.owner = None, None, None
        self.stats = (0, 0)
        self.gens = {}  # session -> ChunkGenerator
        self.idle_latents = {}  # avatar -> [L, C, h, w]

    def autocast(self):
        import contextlib
        if self.bf16:
            return self.torch.autocast("cpu", dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def _cache(self, method, schedule):
        from engine.caching import cache_config
        path = self.config.path(schedule)
        return cache_config(method, self.config.live.steps, schedule=path, stream_schedule=path,
                            calibration=self.config.path(self.config.cache.calibration))

    def generator(self, session, avatar):
        from engine.generator import ChunkGenerator, load_avatar
        if session not in self.gens:
            m = self.config.model
            self.gens[session] = ChunkGenerator(self.model, load_avatar(avatar), steps=self.config.live.steps,
                                                seed=m.seed, guidance=m.guidance, noise_scale=m.noise_scale)
        return self.gens[session]

    def use_level(self, level, owner):
        """Attach the cache of `level`; reset it for a new owner, or bank residuals for the same one."""
        from engine.caching import attach
        if self.level != level:
            if self.handle is not None:
                self.handle.remove()
            cache = self.levels[level]
            self.handle = attach(self.model.dit, cache) if cache is not None else None
            self.level, self.owner, self.stats = level, None, (0, 0)
        if self.handle is not None:
            self.handle.reset(keep_stats=True, next_chunk=self.owner == owner)
        self.owner = owner

    def steps_since(self):
        if self.handle is None:
            return self.config.live.steps, 0
        st = self.handle.stats()
        now = (st["computed_steps"], st["reuse_steps"])
        diff = (now[0] - self.stats[0], now[1] - self.stats[1])
        self.stats = now
        return diff

    def chunk(self, session, avatar, window, level, idle_motion):
        gen = self.generator(session, avatar)
        self.use_level(level, session)
        self.steps_since()
        gen.fixed_noise = bool(getattr(self.levels[level], "stream", False))
        if idle_motion is not None and avatar in self.idle_latents:
            lat = self.idle_latents[avatar]
            mf = self.cfg.motion_frames
            idx = [ping_pong(i, len(lat)) for i in range(idle_motion - mf, idle_motion)]
            gen.motion = lat[idx][None]
        start = time.monotonic()
        with self.autocast():
            frames = gen.chunk(self.torch.from_numpy(window), self.offset)
        end = time.monotonic()
        computed, reused = self.steps_since()
        return frames, {"gen_start": start, "gen_end": end, "gen_ms": (end - start) * 1000,
                        "computed_steps": computed, "reused_steps": reused, "level": level}

    def idle(self, avatar):
        """Generate idle_chunks chunks from silence, continuing motion: the avatar's idle loop."""
        gen = self.generator(("idle", avatar), avatar)
        n = max(1, self.config.live.idle_chunks)
        silence = np.zeros((self.cfg.audio_frames + 2 * (self.offset - self.cfg.lookback)) * SAMPLES_PER_FRAME,
                           np.float32)
        frames, latents = [], []
        for _ in range(n):
            self.use_level(0, ("idle", avatar))
            with self.autocast():
                frames.append(gen.chunk(self.torch.from_numpy(silence), self.offset))
            latents.append(gen.last_latents[0].float())
        del self.gens[("idle", avatar)]
        self.idle_latents[avatar] = self.torch.cat(latents)
        return np.concatenate(frames)


def _pick_precision(w: _Worker, silence, rounds=3) -> str:
    """precision = "auto": time level-0 chunks with and without bfloat16 autocast, alternating, and keep the
    faster. Which wins depends on the CPU: with AMX bf16 was ~1.3x faster; on an AVX-512 CPU without AMX
    the same chunk took ~270 ms in bf16 and ~175 ms in fp32 (one thread)."""
    def timed(bf16):
        w.bf16 = bf16
        return w.chunk("warmup", w.config.engine.avatar, silence, 0, None)[1]["gen_ms"]
    timed(True)  # the first bf16 chunk allocates (fp32 was warmed up by the caller)
    ms = {True: [], False: []}
    for _ in range(rounds):
        for bf16 in (True, False):
            ms[bf16].append(timed(bf16))
    w.bf16 = float(np.median(ms[True])) < float(np.median(ms[False]))
    return "bf16" if w.bf16 else "fp32"


def _worker_main(config: Config, inq, outq):
    try:
        w = _Worker(config)
        # warm up (the first forwards allocate), then time each cache level on a few silent chunks: the
        # policy's first predictions use these instead of guesses
        silence = np.zeros((w.cfg.audio_frames + 2) * SAMPLES_PER_FRAME, np.float32)
        w.chunk("warmup", config.engine.avatar, silence, 0, None)
        if config.live.precision == "auto":
            _pick_precision(w, silence)
        gen_ms = []
        for level in range(len(w.levels)):
            gen_ms.append(float(np.median([w.chunk("warmup", config.engine.avatar, silence, level, None)[1]["gen_ms"]
                                           for _ in range(3)])))
        w.gens.pop("warmup", None)
    except Exception as e:
        outq.put(StartFailed(f"{type(e).__name__}: {e}"))
        return
    outq.put(Ready(gen_ms, "bf16" if w.bf16 else "fp32"))
    parent = mp.parent_process()
    while True:
        try:
            msg = inq.get(timeout=1.0)
        except queue.Empty:
            if parent is not None and not parent.is_alive():  # the server died without closing us
                return
            continue
        if msg is None:
            return
        if isinstance(msg, ChunkRequest):
            try:
                frames, info = w.chunk(msg.session, msg.avatar, msg.window, msg.level, msg.idle_motion)
            except Exception as e:  # one bad chunk must not kill the worker: the session shows idle
                import traceback
                traceback.print_exc()
                frames, info = None, {"error": f"{type(e).__name__}: {e}", "level": msg.level}
            outq.put(ChunkDone(msg.job, frames, info))
        elif isinstance(msg, IdleRequest):
            try:
                outq.put(IdleDone(msg.avatar, w.idle(msg.avatar), None))
            except Exception as e:
                import traceback
                traceback.print_exc()
                outq.put(IdleDone(msg.avatar, None, f"{type(e).__name__}: {e}"))
        elif isinstance(msg, EndSession):
            w.gens.pop(msg.session, None)
        elif isinstance(msg, ForgetIdle):
            w.idle_latents.pop(msg.avatar, None)
