"""Chunk-by-chunk generation, shared by offline render and the live engine.

`Generator` is what render (and the live engine) drive: audio in, one chunk of frames out, the motion
state carried inside from chunk to chunk. Two backends implement it: `ChunkGenerator`, the reference
model (the default), and engine.wan_s2v.WanS2VGenerator, Wan2.2-S2V through the user's diffsynth pipeline.

Reference model: a chunk is W video frames (40 ms each). Its audio window spans `lookback` frames before
and `lookahead` frames after the chunk; the DiT also sees the reference portrait and the last latent
frames of the previous chunk (motion tokens), so consecutive chunks join without seams.
"""
import math
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from engine.audio import FPS, SAMPLE_RATE
from engine.caching import cache_name
from engine.model.audio_encoder import audio_window
from engine.sampler import DEFAULT_GUIDANCE, DEFAULT_NOISE_SCALE, DEFAULT_STEPS, sample


@dataclass
class Avatar:
    """A portrait to animate: the reference frame and its masks."""
    avatar_id: str
    rgb: np.ndarray  # uint8 [128, 128, 3]
    person_mask: np.ndarray  # bool [128, 128]
    face_mask: np.ndarray  # bool [128, 128]


def load_avatar(avatar_id) -> Avatar:
    """Avatar by procedural identity number ("3", "1000", ...)."""
    from engine.data import portraits
    rgb, person, face = portraits.reference(portraits.identity_number(avatar_id))
    return Avatar(str(avatar_id), rgb, person, face)


class Generator(Protocol):
    """A talking-portrait backend, one chunk at a time (motion state inside, reset per utterance)."""
    fps: float  # video frames per second
    frames_per_chunk: int  # W

    def chunk(self, audio: torch.Tensor, start_frame: int) -> np.ndarray:
        """Frames [start_frame, start_frame + W) -> uint8 [W, height, width, 3]; audio: float [S] 16 kHz,
        the whole utterance so far (a backend reads the window it needs)."""

    def reset(self) -> None:
        """A new utterance: motion restarts from the portrait."""

    def cache_stats(self) -> dict:
        """computed_steps, reused_steps, cache_bytes."""

    def close(self) -> None:
        """Detach caches; the model is as it was."""


class ChunkGenerator:
    """Generates one chunk of frames at a time for one avatar, carrying motion latents across chunks."""
    fps = FPS

    def __init__(self, model, avatar: Avatar, steps=DEFAULT_STEPS, seed=0, shift=1.0, cache=None,
                 guidance=DEFAULT_GUIDANCE, noise_scale=DEFAULT_NOISE_SCALE, fixed_noise=False, decoder=None):
        """cache: a synccache.SyncCacheConfig or baselines.BaselineConfig (None: plain model).
        guidance: classifier-free guidance scale on the audio (1.0 = off); noise_scale: the start noise's std.
        fixed_noise: every chunk starts from the same noise (implied by a streaming cache).
        decoder: the FrameAutoencoder that draws the frames (model.ae by default; a second decoder for the same
        latents from engine.model.avatar.load_decoder, e.g. the lite one).
        """
        self.model, self.avatar, self.steps, self.shift = model, avatar, steps, shift
        self.decoder = decoder or model.ae
        self.guidance, self.noise_scale = guidance, noise_scale
        # SyncCache's streaming extension reuses residuals across chunks: every chunk starts from the same
        # noise, so that a step's heavy-block inputs (mostly noise early on) match the previous chunk's
        self.fixed_noise = fixed_noise or bool(getattr(cache, "stream", False))
        self.cache = None
        if cache is not None:
            from engine.caching import attach
            self.cache = attach(model.dit, cache)
        self.cfg = model.cfg
        self.frames_per_chunk = model.cfg.frames
        self.seed = seed
        with torch.no_grad():
            ref = model.ae.to_input(avatar.rgb)[None]
            self.ref_latent = model.ae.encode(ref)  # [1, C, H, W]
        self._feats = {}
        self.face_mask = torch.from_numpy(avatar.face_mask)[None].float()
        self.person_mask = torch.from_numpy(avatar.person_mask)[None].float()
        self.timer = {}
        self.reset()

    def features(self, decoder=None):
        """What `decoder` (this generator's by default) needs of the portrait (FrameAutoencoder.reference),
        computed once per decoder."""
        decoder = decoder or self.decoder
        if id(decoder) not in self._feats:
            with torch.no_grad():
                self._feats[id(decoder)] = decoder, decoder.reference(decoder.to_input(self.avatar.rgb)[None])
        return self._feats[id(decoder)][1]

    @property
    def ref_feats(self):
        return self.features()

    def close(self):
        """Detach the cache hooks: the model is exactly as it was."""
        if self.cache is not None:
            self.cache.remove()
            self.cache = None

    def cache_stats(self):
        """Denoising steps computed / reused so far (all steps computed without a cache)."""
        if self.cache is None:
            return {"computed_steps": int(self.timer.get("steps", 0)), "reused_steps": 0, "cache_bytes": 0}
        st = self.cache.stats()
        return {"computed_steps": st["computed_steps"], "reused_steps": st["reuse_steps"],
                "cache_bytes": int(st.get("peak_cache_bytes", st.get("cache_bytes", 0)))}

    def reset(self):
        """New utterance/session: motion restarts from the reference pose, the noise stream from the seed."""
        self.motion = self.ref_latent[:, None].repeat(1, self.cfg.motion_frames, 1, 1, 1)
        self.rng = torch.Generator().manual_seed(self.seed)
        self.timer = {"dit_ms": 0.0}
        self.noise = None
        self.chunks = 0
        if self.cache is not None:
            self.cache.reset(keep_stats=True)

    def audio_tokens(self, audio, start_frame):
        """Audio encoder tokens for the chunk starting at start_frame; audio: float tensor [S] 16 kHz."""
        cfg = self.cfg
        win = audio_window(audio, start_frame - cfg.lookback, cfg.audio_frames)
        return self.model.audio(win[None])

    @torch.no_grad()
    def chunk(self, audio, start_frame):
        """Generate frames [start_frame, start_frame + W) -> uint8 [W, 128, 128, 3]."""
        if self.cache is not None and self.chunks > 0:  # residuals belong to one chunk (stream: banked)
            self.cache.reset(keep_stats=True, next_chunk=True)
        inputs = self.inputs(audio, start_frame)
        cond = self.model.dit.prepare(*inputs[:-1], null_audio=self.guidance != 1.0)
        z = sample(self.model.dit, cond, inputs[-1], self.steps, self.shift, timer=self.timer,
                   guidance=self.guidance)
        return self.finish(z)

    def inputs(self, audio, start_frame, tokens=True):
        """What one chunk's sampling needs, batch 1: (ref_latent, motion, audio tokens, face mask, person
        mask, start noise), or with tokens=False the audio window [1, S] in place of its tokens; draws the
        chunk's noise from this generator's stream."""
        cfg = self.cfg
        shape = (1, cfg.frames, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        if self.noise is None or not self.fixed_noise:
            self.noise = torch.randn(shape, generator=self.rng) * self.noise_scale
        self.chunks += 1
        audio_in = self.audio_tokens(audio, start_frame) if tokens else \
            audio_window(audio, start_frame - cfg.lookback, cfg.audio_frames)[None]
        return self.ref_latent, self.motion, audio_in, self.face_mask, self.person_mask, self.noise

    def finish(self, z, decode=True):
        """The sampled chunk latent [1, W, C, h, w] -> frames (None without decode); carries its motion
        into the next chunk."""
        self.motion = z[:, -self.cfg.motion_frames:]
        self.last_latents = z  # [1, W, C, h, w]: the live engine keeps idle-loop latents
        if decode:
            return self.decoder.to_uint8(self.decoder.decode(z[0], self.ref_feats))
        return None


@torch.no_grad()
def chunk_batch(gens: list, windows: list, starts: list, timer: dict | None = None) -> list:
    """One chunk of each of several sessions, denoised together in one batch -> [frames per session].

    Each generator keeps its own motion latents and noise stream; the batch follows one sampling plan, so
    a cache that decides per step (SyncCache's offline schedule, attached to the shared DiT by the
    caller) treats every session alike and each session gets what it would get alone (up to float
    rounding). The generators must share the model and sampling settings and have no cache of their own.
    """
    return decode_batch(gens, denoise_batch(gens, windows, starts, timer))


@torch.no_grad()
def denoise_batch(gens: list, windows: list, starts: list, timer: dict | None = None) -> torch.Tensor:
    """The DiT half of chunk_batch -> latents [B, W, C, h, w]; each generator's motion already carried, so
    the next chunk can be denoised while these are decoded (the live worker's pipeline)."""
    first = gens[0]
    for g in gens:
        if g.model is not first.model or (g.steps, g.shift, g.guidance) != (first.steps, first.shift, first.guidance):
            raise ValueError("chunk_batch: generators must share the model, steps, shift and guidance")
        if g.cache is not None:
            raise ValueError("chunk_batch: attach the cache to the shared DiT, not to a generator")
    model = first.model
    parts = [g.inputs(a, s, tokens=False) for g, a, s in zip(gens, windows, starts)]
    ref, motion, audio, face, person, noise = (torch.cat(p) for p in zip(*parts))
    cond = model.dit.prepare(ref, motion, model.audio(audio), face, person, null_audio=first.guidance != 1.0)
    z = sample(model.dit, cond, noise, first.steps, first.shift, timer=timer, guidance=first.guidance)
    for i, g in enumerate(gens):
        g.finish(z[i:i + 1], decode=False)
    return z


@torch.no_grad()
def decode_batch(gens: list, z: torch.Tensor, decoder=None) -> list:
    """The decoder half of chunk_batch: latents [B, W, C, h, w] -> [uint8 frames [W, 128, 128, 3] per
    generator], one decoder pass for every frame, each frame with its own portrait's features.
    decoder: the FrameAutoencoder that draws them (the first generator's by default)."""
    ae, w = decoder or gens[0].decoder, z.shape[1]
    if len(gens) == 1:  # as ChunkGenerator.chunk decodes: the portrait's features broadcast
        return [ae.to_uint8(ae.decode(z[0], gens[0].features(ae)))]
    feats = [g.features(ae) for g in gens]
    image = torch.cat([f[1] for f in feats]).repeat_interleave(w, 0)
    feats = [torch.cat([f[0][k] for f in feats]).repeat_interleave(w, 0) for k in range(len(feats[0][0]))]
    frames = ae.to_uint8(ae.decode(z.flatten(0, 1), (feats, image)))
    return [frames[i * w:(i + 1) * w] for i in range(len(gens))]


def render_frames(model, avatar, audio, steps=DEFAULT_STEPS, seed=0, progress=False, cache=None,
                  guidance=DEFAULT_GUIDANCE, noise_scale=DEFAULT_NOISE_SCALE, decoder=None):
    """Audio (float32 16 kHz mono) -> (frames uint8 [T,128,128,3], stats dict), T = ceil(audio_s * 25).

    cache: None (plain model) or a synccache.SyncCacheConfig; guidance, noise_scale, decoder: see ChunkGenerator.
    """
    t_start = time.perf_counter()
    gen = ChunkGenerator(model, avatar, steps=steps, seed=seed, cache=cache, guidance=guidance,
                         noise_scale=noise_scale, decoder=decoder)
    frames, stats = render_with(gen, audio, progress)
    total_ms = (time.perf_counter() - t_start) * 1000
    stats |= {"steps": steps, "guidance": guidance, "dit_ms": round(gen.timer["dit_ms"], 1),
              "total_ms": round(total_ms, 1),
              "rtf": round(total_ms / 1000 / stats["audio_s"], 4) if stats["audio_s"] > 0 else None,
              "cache": cache_name(cache)}
    return frames, stats


def render_with(gen: Generator, audio, progress=False):
    """Drive any Generator over a whole utterance -> (frames uint8 [T, h, w, 3], stats), T = ceil(audio_s *
    gen.fps); closes the generator. Stats: frames, chunks, audio_s, fps, total_ms, rtf and the cache's."""
    t_start = time.perf_counter()
    audio_t = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    audio_s = len(audio) / SAMPLE_RATE
    total = max(1, math.ceil(audio_s * gen.fps))
    w = gen.frames_per_chunk
    chunks = math.ceil(total / w)
    it = range(chunks)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="render", unit="chunk")
    try:
        frames = [gen.chunk(audio_t, c * w) for c in it]
        cache_stats = gen.cache_stats()
    finally:
        gen.close()
    frames = np.concatenate(frames)[:total]
    total_ms = (time.perf_counter() - t_start) * 1000
    return frames, {"frames": int(total), "chunks": chunks, "audio_s": round(audio_s, 4), "fps": gen.fps,
                    "total_ms": round(total_ms, 1),
                    "rtf": round(total_ms / 1000 / audio_s, 4) if audio_s > 0 else None} | cache_stats
