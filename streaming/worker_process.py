"""The generation worker process: the model, the chunks of every session, the idle loops.

Started by `GenerationWorker` (streaming/worker.py) with `main`; it speaks the messages of
streaming/protocol.py.

Generation runs in its own process, not a thread of the server: the event loop then never waits on the
GIL, and torch on this CPU is ~1.7x slower from a secondary thread than from a process's main thread
(measured: 187 vs 112 ms per chunk, interleaved in one process).

Continuous batching: the worker takes the chunks that are due, one per session, and denoises them as one
batch (engine.generator.chunk_batch) under one SyncCache plan, at the highest level any of them asked
for, after waiting up to `batch_wait_ms` for the other speaking sessions' chunks (sessions share one chunk
grid: `GenerationWorker.aligned_start`). Sessions join and leave between chunks; each keeps its own motion
latents and noise stream.

Two stages: the main thread denoises (audio features and the DiT), a second thread decodes the latents to
frames (`DecodeStage`, `[live] pipeline_decode`). The next chunk needs only the last chunk's latents (its
motion), so the DiT of chunk c + 1 runs while chunk c is decoded, on the core the worker's one torch thread
leaves free. Measured on a 2-core Xeon with AMX (docs/live/stop15/stages.json: bf16, one thread each, 10
live steps): DiT 54.3 ms and decode 29.5 ms alone, 67.5 and 32.4 ms side by side on two threads (the GIL
costs the DiT ~24%; two processes cost ~2% but need a second model and its own start-up). The worker keeps
up while the slower stage fits a chunk period. A batch leaving the DiT is reported (DitDone); the decoder
does each chunk's first frame first and reports it at once (FirstFrame): it is due 40 ms before the next.

The backpressure policy climbs a ladder of levels (`[[live.levels]]`, gentlest first): each is a cache
method with its plan (SyncCache's offline schedule by default) and a guidance scale; the worker
re-attaches hooks when the level changes, and resets the cache before every chunk or batch (banking
residuals across chunks only for a session that runs alone under the streaming extension).
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from engine.audio import SAMPLES_PER_FRAME
from engine.config import Config
from streaming.protocol import (ACTIVE_S, ChunkDone, ChunkRequest, DitDone, EndSession,
                                FirstFrame, ForgetIdle, IdleDone, IdleRequest, Ready, StartFailed, ping_pong,
                                every_frame_ms, rest_share)


class _Worker:
    """Lives in the worker process: the model, the attached cache level, per-session generators."""

    def __init__(self, config: Config):
        import torch

        from engine.model.audio_encoder import MARGIN_FRAMES
        from engine.model.avatar import load_decoder, load_model
        self.torch = torch
        if config.live.worker_threads > 0:
            torch.set_num_threads(config.live.worker_threads)
        self.config = config
        m, live = config.model, config.live
        self.model = load_model(config.path(m.weights))
        self.cfg = self.model.cfg
        self.offset = self.cfg.lookback + MARGIN_FRAMES  # chunk start inside a job's window, in frames
        self.levels = [self._cache(lvl.cache, lvl.schedule, lvl.share_guidance) for lvl in live.levels]  # per level
        self.guidance = [m.guidance if lvl.guidance is None else lvl.guidance for lvl in live.levels]
        self.decode_every = [lvl.decode_every for lvl in live.levels]
        loaded = {}  # each decoder file once; None: the model's own decoder
        self.decoders = [loaded.setdefault(lvl.decoder, load_decoder(config.path(lvl.decoder), self.model))
                         if lvl.decoder else None for lvl in live.levels]
        for i, k in enumerate(self.decode_every):
            if self.cfg.frames % k:
                raise ValueError(f"[live] levels[{i}] decode_every = {k} must divide the model's "
                                 f"{self.cfg.frames} frames per chunk")
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

    def _cache(self, method, schedule, share_guidance=False):
        from engine.caching import cache_config
        path = self.config.path(schedule) if schedule else None
        return cache_config(method, self.config.live.steps, schedule=path, stream_schedule=path,
                            calibration=self.config.path(self.config.cache.calibration),
                            share_guidance=share_guidance)

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

    def _from_idle(self, gen, avatar, idle_motion):
        """Continue a session's motion from the idle frames shown before global frame idle_motion."""
        if idle_motion is not None and avatar in self.idle_latents:
            lat = self.idle_latents[avatar]
            mf = self.cfg.motion_frames
            idx = [ping_pong(i, len(lat)) for i in range(idle_motion - mf, idle_motion)]
            gen.motion = lat[idx][None]

    def chunk(self, session, avatar, window, level, idle_motion):
        """One chunk alone, both stages in sequence -> (frames, info)."""
        return self.chunks([ChunkRequest(-1, session, avatar, window, level, idle_motion)])[0]

    def batchable(self, level) -> bool:
        """Chunks of several sessions may share a batch at this level: no cache, or SyncCache following its
        offline schedule (one plan for the whole batch). Online-probing caches decide per sample, and the
        streaming extension banks residuals per session, so those run one chunk at a time."""
        from synccache import SyncCacheConfig
        c = self.levels[level]
        return c is None or (isinstance(c, SyncCacheConfig) and c.schedule is not None and not c.stream)

    def chunks(self, reqs: list) -> list:
        """Chunks of different sessions, both stages in sequence -> [(frames, info)] in the order of reqs."""
        return [out for d in self.denoise(reqs) for out in self.decode(d)]

    def denoise(self, reqs: list) -> list:
        """The DiT stage -> [Denoised]: one batch at the highest cache level the chunks ask for where that
        level may batch, else one chunk after another at their own levels."""
        from engine.generator import denoise_batch
        level = max(r.level for r in reqs)
        if len(reqs) > 1 and not self.batchable(level):
            return [d for r in reqs for d in self.denoise([r])]
        gens = [self.generator(r.session, r.avatar) for r in reqs]
        if len(reqs) == 1:  # alone: a streaming cache may bank residuals for this session's next chunk
            self.use_level(level, reqs[0].session)
            gens[0].fixed_noise = bool(getattr(self.levels[level], "stream", False))
        else:
            self.use_level(level, None)  # a batch owns no residuals across chunks
            for g in gens:
                g.fixed_noise = False
        for g, r in zip(gens, reqs):
            g.guidance = self.guidance[level]
            self._from_idle(g, r.avatar, r.idle_motion)
        self.steps_since()
        start = time.monotonic()
        with self.autocast():
            z = denoise_batch(gens, [self.torch.from_numpy(r.window) for r in reqs], [self.offset] * len(reqs))
        dit_ms = (time.monotonic() - start) * 1000
        computed, reused = self.steps_since()
        return [Denoised([r.job for r in reqs], gens, z, {
            "gen_start": start, "dit_ms": dit_ms, "computed_steps": computed, "reused_steps": reused,
            "level": level, "batch": len(reqs)})]

    def decode(self, d: "Denoised", early=None) -> list:
        """The decoder stage -> [(frames, info)] per chunk. The first frame of every chunk is decoded first
        (it is due first; the others follow 40 ms apart): early(job, first frames, when ready), if given, gets
        it before the rest are decoded (docs/live/stop15/stages.json: 9.9 + 22.0 ms, 4 at once 29.3). A level
        with decode_every k decodes frames 0, k, 2k, ... and shows each k times, with the level's decoder.
        info: the DiT stage's plus first_ms / decode_ms (first frame / all), gen_end / gen_ms (all frames
        ready, counted from the DiT stage's start, any wait for the decoder included)."""
        from engine.generator import decode_batch
        k, decoder = self.decode_every[d.info["level"]], self.decoders[d.info["level"]]
        start = time.monotonic()
        with self.autocast():  # decode_batch runs without autograd
            heads = decode_batch(d.gens, d.z[:, :1], decoder)
            first = time.monotonic()
            if early is not None:
                for job, f in zip(d.jobs, heads):
                    early(job, f, first)
            rests = decode_batch(d.gens, d.z[:, k::k], decoder) if d.z.shape[1] > k else [f[:0] for f in heads]
        end = time.monotonic()
        info = d.info | {"first_ms": (first - start) * 1000, "decode_ms": (end - start) * 1000, "gen_end": end,
                         "gen_ms": (end - d.info["gen_start"]) * 1000}
        return [(np.repeat(np.concatenate([h, r]), k, axis=0), info | {"batch_index": i})
                for i, (h, r) in enumerate(zip(heads, rests))]

    def idle(self, avatar):
        """Generate idle_chunks chunks from silence, continuing motion: the avatar's idle loop."""
        gen = self.generator(("idle", avatar), avatar)
        n = max(1, self.config.live.idle_chunks)
        silence = np.zeros((self.cfg.audio_frames + 2 * (self.offset - self.cfg.lookback)) * SAMPLES_PER_FRAME,
                           np.float32)
        frames, latents = [], []
        gen.guidance = self.guidance[0]
        for _ in range(n):
            self.use_level(0, ("idle", avatar))
            with self.autocast():
                frames.append(gen.chunk(self.torch.from_numpy(silence), self.offset))
            latents.append(gen.last_latents[0].float())
        del self.gens[("idle", avatar)]
        self.idle_latents[avatar] = self.torch.cat(latents)
        return np.concatenate(frames)


@dataclass
class Denoised:
    """A batch between the worker's two stages: denoised (motion carried), not decoded yet."""
    jobs: list  # job ids, one per chunk
    gens: list  # the chunks' generators (their portraits' features decode them)
    z: object  # torch latents [B, W, C, h, w]
    info: dict  # gen_start, dit_ms, computed_steps, reused_steps, level, batch


class DecodeStage:
    """Decodes denoised batches and reports them (ChunkDone on the out queue): on a thread of its own while
    the main thread denoises the next batch, or inline (threaded=False: the stages in sequence)."""

    def __init__(self, w: "_Worker", outq, threaded: bool):
        self.w, self.outq = w, outq
        self.q = queue.Queue() if threaded else None
        self.thread = None
        if threaded:
            self.thread = threading.Thread(target=self._run, name="syncavatar-decode", daemon=True)
            self.thread.start()

    def put(self, d: Denoised) -> None:
        if self.q is None:
            self._report(d)
        else:
            self.q.put(d)

    def _run(self):
        if self.w.config.live.worker_threads > 0:  # torch's thread count is per thread: set it here too
            self.w.torch.set_num_threads(self.w.config.live.worker_threads)
        while (d := self.q.get()) is not None:
            self._report(d)

    def _report(self, d: Denoised) -> None:
        """FirstFrame of each chunk as soon as it is decoded, then ChunkDone with the frames after it."""
        sent = set()

        def early(job, frames, ready):
            self.outq.put(FirstFrame(job, frames, ready))
            sent.add(job)
        try:
            results = self.w.decode(d, early)
        except Exception as e:  # its sessions show idle frames (the first ones, if sent); the worker goes on
            import traceback
            traceback.print_exc()
            results = [(None, d.info | {"error": f"{type(e).__name__}: {e}"})] * len(d.jobs)
        for job, (frames, info) in zip(d.jobs, results):
            first = 1 if job in sent else 0
            self.outq.put(ChunkDone(job, frames if frames is None else frames[first:], info, first))

    def close(self) -> None:
        """Decode what is queued, then stop."""
        if self.thread is not None:
            self.q.put(None)
            self.thread.join(timeout=30)


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


def _pick_audio_backend(w: _Worker, silence) -> dict:
    """Install the configured audio backend; "auto" times a level-0 chunk with each candidate (after the
    precision is chosen, so it is compared in the precision the worker runs)."""
    from engine import audio_path
    m = w.config.model
    run = lambda: w.chunk("warmup", w.config.engine.avatar, silence, 0, None)  # noqa: E731
    path, info = audio_path.choose(m.audio_backend, w.model, run=run,
                                   onnx_dir=w.config.path(m.onnx_dir) if m.onnx_dir else None, log=lambda s: None)
    w.audio_path = audio_path.install(w.model, path)
    return info


def time_batches(w: _Worker, silence, level: int, max_batch: int, rounds: int = 2):
    """([DiT-stage ms], [decode ms], [first-frame decode ms]) of a batch of B = 1..max_batch silent warm-up
    chunks at a cache level (median of `rounds`); B = 1 only where the level cannot batch (its chunks then
    run one after another)."""
    dit, dec, first = [], [], []
    for n in range(1, (max_batch if w.batchable(level) else 1) + 1):
        reqs = [ChunkRequest(-1, f"warmup{b}", w.config.engine.avatar, silence, level, None) for b in range(n)]
        infos = [w.chunks(reqs)[0][1] for _ in range(rounds)]
        dit.append(float(np.median([i["dit_ms"] for i in infos])))
        dec.append(float(np.median([i["decode_ms"] for i in infos])))
        first.append(float(np.median([i["first_ms"] for i in infos])))
    return dit, dec, first


def _decode_scale(times, share: float, every_ms: float, first_ms: float) -> float:
    """What a level's own decoder costs against the model's: its decoding of one chunk (time_batches) as every
    frame would take, over the model's decoder's every_ms; by first frames where the level decodes no other."""
    _, dec, first = times
    return every_frame_ms(dec[0], first[0], share) / every_ms if share > 0 else first[0] / first_ms


def next_batch(first: ChunkRequest, backlog: collections.deque, max_batch: int) -> list:
    """`first` plus the queued chunks that may join it, taken out of the backlog: other sessions' chunks,
    oldest first, up to max_batch, never past a control message (so an EndSession still follows its
    session's chunks). One chunk per session per batch: none is starved. The batch runs at the highest
    cache level asked by its chunks (backpressure degrades every session in it alike, not one alone)."""
    batch = [first]
    join(batch, backlog, max_batch)
    return batch


def join(batch: list, backlog: collections.deque, max_batch: int) -> bool:
    """Move into `batch` the queued chunks that may join it (see next_batch); False once a control
    message blocks the way."""
    sessions = {r.session for r in batch}
    for m in list(backlog):
        if len(batch) >= max_batch:
            return True
        if not isinstance(m, ChunkRequest):
            return False
        if m.session not in sessions:
            batch.append(m)
            sessions.add(m.session)
            backlog.remove(m)
    return True


def gather(batch: list, backlog: collections.deque, inq, max_batch: int, expected: set, wait_s: float) -> None:
    """Wait up to wait_s for the chunks of the `expected` sessions (active ones not in the batch yet) to
    join it. Sessions' chunk grids are aligned (GenerationWorker.aligned_start), so their chunks fall due
    within a few ms of each other; without the wait the worker would start on the first and serve the
    others alone, one after another."""
    deadline = time.monotonic() + wait_s
    while len(batch) < max_batch and expected - {r.session for r in batch}:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        try:
            backlog.append(inq.get(timeout=left))
        except queue.Empty:
            return
        if backlog[-1] is None or not join(batch, backlog, max_batch):
            return


def main(config: Config, inq, outq):
    """The process's entry point: load, time each level, report Ready (or StartFailed), then serve."""
    try:
        w = _Worker(config)
        # warm up (the first forwards allocate), then time each cache level on a few silent chunks: the
        # policy's first predictions use these instead of guesses
        silence = np.zeros((w.cfg.audio_frames + 2) * SAMPLES_PER_FRAME, np.float32)
        w.chunk("warmup", config.engine.avatar, silence, 0, None)
        for level, decoder in enumerate(w.decoders):  # a level's own decoder: its first calls, its portrait features
            if decoder is not None:
                w.chunk("warmup", config.engine.avatar, silence, level, None)
        if config.live.precision == "auto":
            _pick_precision(w, silence)
        audio = _pick_audio_backend(w, silence)
        pipelined = config.live.pipeline_decode
        times = [time_batches(w, silence, level, max(1, config.live.max_batch), rounds=3)
                 for level in range(len(w.levels))]
        gen_ms = [dit[0] + dec[0] for dit, dec, _ in times]  # one chunk alone, all frames after both stages
        dit_ms = [dit for dit, _, _ in times]
        # decoding every frame with the model's decoder costs the same at every level: from the level with the
        # most batch sizes timed, its decode_every undone (the server scales it back per level); a level with a
        # decoder of its own ([[live.levels]] decoder) costs decode_scale times that
        level = max(range(len(times)), key=lambda lvl: (w.decoders[lvl] is None, len(times[lvl][1]),
                                                         w.decode_every[lvl] == 1))
        _, decode_ms, first_ms = times[level]
        decode_ms = [every_frame_ms(d, f, rest_share(w.cfg.frames, w.decode_every[level]))
                     for d, f in zip(decode_ms, first_ms)]
        scale = [1.0 if w.decoders[lvl] is w.decoders[level] else _decode_scale(
            times[lvl], rest_share(w.cfg.frames, w.decode_every[lvl]), decode_ms[0], first_ms[0])
            for lvl in range(len(times))]
        for b in range(config.live.max_batch):
            w.gens.pop(f"warmup{b}", None)
        w.gens.pop("warmup", None)
    except Exception as e:
        outq.put(StartFailed(f"{type(e).__name__}: {e}"))
        return
    outq.put(Ready(gen_ms, "bf16" if w.bf16 else "fp32", dit_ms, audio["backend"], audio["ms"], decode_ms,
                   first_ms, pipelined, scale))
    stage = DecodeStage(w, outq, threaded=pipelined)
    try:
        _serve(w, config, inq, outq, stage)
    finally:
        stage.close()


def _serve(w: _Worker, config: Config, inq, outq, stage: DecodeStage):
    """The worker's loop: batch the chunks that are due, denoise them, hand them to the decode stage."""
    parent = mp.parent_process()
    backlog = collections.deque()
    last_seen = {}  # session -> when the worker last received one of its chunks
    while True:
        if not backlog:
            try:
                backlog.append(inq.get(timeout=1.0))
            except queue.Empty:
                if parent is not None and not parent.is_alive():  # the server died without closing us
                    return
                continue
        while True:  # everything already queued: chunks due now are batched together
            try:
                backlog.append(inq.get_nowait())
            except queue.Empty:
                break
        now = time.monotonic()
        for m in backlog:  # a session that sends chunks is active, whether or not it was served yet
            if isinstance(m, ChunkRequest):
                last_seen[m.session] = now
        msg = backlog.popleft()
        if msg is None:
            return
        if isinstance(msg, ChunkRequest):
            max_batch = max(1, config.live.max_batch)
            batch = next_batch(msg, backlog, max_batch)
            active = {k for k, t in last_seen.items() if now - t < ACTIVE_S}
            if max_batch > 1 and w.batchable(max(r.level for r in batch)):
                gather(batch, backlog, inq, max_batch, active, config.live.batch_wait_ms / 1000)
            for r in batch:  # those that arrived while gathering are active too
                last_seen[r.session] = time.monotonic()
            try:
                denoised = w.denoise(batch)
            except Exception as e:  # one bad chunk must not kill the worker: its sessions show idle
                import traceback
                traceback.print_exc()
                for r in batch:
                    outq.put(ChunkDone(r.job, None, {"error": f"{type(e).__name__}: {e}", "level": r.level}))
                continue
            for d in denoised:
                outq.put(DitDone(d.jobs, d.info["gen_start"] + d.info["dit_ms"] / 1000, d.info["level"]))
                stage.put(d)
        elif isinstance(msg, IdleRequest):
            try:
                outq.put(IdleDone(msg.avatar, w.idle(msg.avatar), None))
            except Exception as e:
                import traceback
                traceback.print_exc()
                outq.put(IdleDone(msg.avatar, None, f"{type(e).__name__}: {e}"))
        elif isinstance(msg, EndSession):
            w.gens.pop(msg.session, None)
            last_seen.pop(msg.session, None)
        elif isinstance(msg, ForgetIdle):
            w.idle_latents.pop(msg.avatar, None)
