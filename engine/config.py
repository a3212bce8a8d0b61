"""Configuration: one TOML file (configs/default.toml) read with tomllib into typed dataclasses."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from engine.caching import SYNCCACHE_METHODS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "default.toml"


class ConfigError(ValueError):
    """The config file is missing, not TOML, or has unknown keys / wrong types."""


@dataclass
class ModelConfig:
    weights: str = "engine/weights/avatar.safetensors"
    expert: str = "engine/weights/lipsync_expert.safetensors"
    steps: int = 20  # Euler steps per chunk
    seed: int = 0
    guidance: float = 3.0  # classifier-free guidance on the audio; 1.0 = off (half the DiT batch)
    noise_scale: float = 0.5  # std of the start noise: fewer random mouth shapes (dev: 0.5 best of 0.3-0.7)
    # the audio encoder and audio blocks (engine/audio_path.py): auto, torch, compile, onnxruntime, tensorrt.
    # auto: tensorrt where CUDA and tensorrt are present, else the faster of torch and onnxruntime, timed
    # on live chunks at worker start-up
    audio_backend: str = "auto"
    onnx_dir: str = ""  # exported audio-path graphs ("": exported on first use into ~/.cache/syncavatar)


@dataclass
class EngineConfig:
    avatar: str = "0"


@dataclass
class CacheConfig:
    schedule: str = "configs/synccache/ref-XS.json"  # SyncCache's offline DP schedule
    stream_schedule: str = "configs/synccache/ref-XS-stream.json"  # synccache-stream's schedule
    calibration: str = "configs/synccache/peers.json"  # TeaCache / MagCache calibration


@dataclass
class LevelConfig:
    """One level of the live backpressure ladder: how a chunk is denoised there."""
    cache: str = "synccache"  # a cache method (engine.caching.METHODS)
    schedule: str = ""  # SyncCache's offline DP plan, solved for [live] steps ("" for methods without one)
    guidance: float | None = None  # classifier-free guidance; None: [model] guidance (1.0 = off, half the batch)
    # decode frames 0, k, 2k, ... of a chunk and show each k times (1: every frame). Where decoding is the
    # slower stage (CPUs without AMX), 2 halves what is left after the first frame and the mouth moves at
    # 12.5 fps, where a skipped chunk would show the idle loop. It must divide the frames per chunk
    decode_every: int = 1
    # a second decoder for the model's latents that draws this level's frames ("": the model's own), e.g. the
    # lite decoder (engine/weights/decoder-lite.safetensors: 0.62x the cost, a softer picture)
    decoder: str = ""
    # guided chunks run SyncCache's heavy blocks once for the pair [with audio; null audio], the audio blocks on
    # both (SyncCacheConfig.share_guidance): guidance at little more than the cost of none
    share_guidance: bool = False

    def name(self) -> str:
        """The level in telemetry: the method, its plan, the guidance where it differs, the frames decoded and
        the decoder where it is not the model's own."""
        name = f"{self.cache} ({Path(self.schedule).stem})" if self.schedule else self.cache
        name = name if self.guidance is None else f"{name}, guidance {self.guidance:g}"
        name = f"{name}, shared guidance" if self.share_guidance and self.guidance != 1.0 else name
        name = name if self.decode_every == 1 else f"{name}, 1 frame in {self.decode_every} decoded"
        return f"{name}, decoder {Path(self.decoder).stem}" if self.decoder else name


@dataclass
class LiveConfig:
    """The live session pipeline (streaming/session.py)."""
    steps: int = 10  # Euler steps per live chunk (uncached dev sync_conf: 0.792 at 10 steps, 0.799 at 20)
    # the backpressure ladder, gentlest first ([[live.levels]] tables): level 0 while chunks are on time,
    # each level up cheaper (more reuse, then a cheaper decoder); above the last, whole chunks go idle
    levels: list = field(default_factory=lambda: [  # as configs/default.toml ships them
        LevelConfig("synccache", "configs/synccache/ref-XS-10-gentle.json", share_guidance=True),
        LevelConfig("synccache", "configs/synccache/ref-XS-10-boost.json", share_guidance=True),
        LevelConfig("synccache", "configs/synccache/ref-XS-10-max.json", share_guidance=True),
        LevelConfig("synccache", "configs/synccache/ref-XS-10-max.json", share_guidance=True,
                    decoder="engine/weights/decoder-lite.safetensors"),
        LevelConfig("synccache", "configs/synccache/ref-XS-10-max.json", 1.0,
                    decoder="engine/weights/decoder-lite.safetensors")])
    precision: str = "auto"  # "bf16" (autocast), "fp32", or "auto": the faster, timed at worker start-up
    lookahead_wait: int = 2  # look-ahead frames a chunk waits for (the model has 2; fewer = zeros, less latency)
    playout_delay_ms: int = 400  # frame i is shown this long after its audio was captured (one clock)
    vad_mode: int = 3  # webrtcvad aggressiveness 0..3
    hangover_ms: int = 200  # speech stays on this long after VAD last heard it (lets the mouth close)
    max_ahead_chunks: int = 4  # bounded queue: chunks waiting for or in generation
    gap_fill_ms: int = 150  # input more than this behind the clock (a network gap): pad with silence
    idle_chunks: int = 8  # model-generated idle loop (silence), played ping-pong
    recover_chunks: int = 8  # on-time chunks before the policy steps back down
    safety_ms: int = 20  # a chunk predicted to finish later than its deadline minus this is "behind"
    worker_threads: int = 1  # torch threads of the generation worker; 0 = torch's default (all cores)
    pipeline_decode: bool = True  # decode chunk c on a second thread while the DiT denoises chunk c + 1
    max_batch: int = 4  # chunks of different sessions the worker denoises together in one batch (1 = off)
    batch_wait_ms: int = 30  # how long the worker waits for other active sessions' chunks to join a batch
    transport_ms: int = 140  # network + jitter buffers, for the latency estimate only (loopback: ~130 ms)


@dataclass
class ServerConfig:
    """`syncavatar serve`: HTTP, WebRTC and telemetry."""
    host: str = "127.0.0.1"
    port: int = 8080
    telemetry: str = "tcp://127.0.0.1:5556"  # ZMQ PUB address; "" = off
    ice_servers: list = field(default_factory=list)  # e.g. ["stun:stun.example.org:3478"]
    host_candidates: list = field(default_factory=list)  # [] = discover; ["127.0.0.1"] = loopback only
    max_sessions: int = 4  # hard cap; below it, sessions are admitted by the worker's measured capacity
    admit_by_capacity: bool = True  # 503 when the worker cannot generate one more session's chunks on time
    audio_jitter_frames: int = 1  # received audio packets aiortc buffers before decoding (its own default: 4)
    connect_timeout_s: float = 30.0  # a session whose peer has not connected by then is closed
    max_sessions_per_client: int = 1  # sessions one client address may hold at once
    request_timeout_s: float = 10.0  # a request body not fully received by then gets 408
    idle_loops: int = 4  # idle loops kept in memory (least recently used dropped; the default avatar stays)
    allowed_origins: list = field(default_factory=list)  # browser Origins allowed besides the server's own
    token: str = ""  # bearer token required on /offer and /sessions ("" = none; env SYNCAVATAR_TOKEN wins)


@dataclass
class SoakConfig:
    """`syncavatar soak`: the thresholds whose breach makes it exit non-zero."""
    latency_p95_growth_pct: float = 10.0  # p95 latency, last 5 minutes against the first 5
    av_drift_ms: float = 40.0  # change of the A/V offset, first minute against the last
    rss_growth_pct: float = 5.0  # server + worker RSS, after warm-up against the end
    threads_growth: int = 8  # server + worker threads, start against the end
    open_files_growth: int = 8  # server + worker open files (sockets included), start against the end
    min_fps: float = 20.0  # every session, every reported interval
    max_errors: int = 0  # session errors, disconnects and failed connects


@dataclass
class ClusterConfig:
    """`syncavatar serve --workers N`: avatar-worker replicas on Ray Serve behind the aiohttp front."""
    workers: int = 0  # replicas; 0 = one process, no Ray (the default)
    num_cpus: float = 1.0  # Ray resources of one replica
    num_gpus: float = 0.0  # 1 per replica on GPU machines
    telemetry_in: str = "tcp://127.0.0.1:5557"  # where replicas publish; the front relays to [server] telemetry
    replica_timeout_s: float = 60.0  # an offer a replica has not answered by then gets 503
    max_workers: int = 0  # > workers: Serve autoscales between workers and max_workers replicas
    sessions_per_worker: float = 1.0  # autoscaling target: live sessions per replica
    drain_timeout_s: float = 600.0  # a replica being stopped waits this long for its sessions to end


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    live: LiveConfig = field(default_factory=LiveConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    soak: SoakConfig = field(default_factory=SoakConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def path(self, p: str) -> Path:
        """Resolve a path from the config relative to the repository root."""
        q = Path(p)
        return q if q.is_absolute() else ROOT / q


# keys that moved: (section, key) -> what replaces them
MOVED = {("live", k): "[[live.levels]] (a table per backpressure level: cache, schedule, guidance)"
         for k in ("cache", "schedule", "boost_cache", "boost_schedule")}


def _section(cls, data: dict, name: str):
    known = {f.name: f for f in fields(cls)}
    for k, v in data.items():
        if (name, k) in MOVED:
            raise ConfigError(f"[{name}] {k} has moved to {MOVED[(name, k)]}")
        if k not in known:
            raise ConfigError(f"unknown key [{name}] {k}")
        want = type(getattr(cls(), k))
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            data = data | {k: float(v)}
        elif not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise ConfigError(f"[{name}] {k} must be {want.__name__}, got {v!r}")
    return cls(**data)


def _read(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config is not valid TOML ({e}): {path}") from None


def load_config(path=DEFAULT_CONFIG) -> Config:
    """configs/default.toml, with the keys of `path` (if another file) laid over it section by section."""
    path = Path(path)
    data = _read(path)
    sections = {"model": ModelConfig, "engine": EngineConfig, "cache": CacheConfig, "live": LiveConfig,
                "server": ServerConfig, "soak": SoakConfig, "cluster": ClusterConfig}
    for k in data:
        if k not in sections:
            raise ConfigError(f"unknown section [{k}] in {path}")
    if path.resolve() != DEFAULT_CONFIG.resolve() and DEFAULT_CONFIG.exists():
        base = _read(DEFAULT_CONFIG)
        data = {k: base.get(k, {}) | data.get(k, {}) for k in sections}
    config = Config(**{k: _section(cls, data.get(k, {}), k) for k, cls in sections.items()})
    backends = ("auto", "torch", "compile", "onnxruntime", "tensorrt")  # engine/audio_path.py
    if config.model.audio_backend not in backends:
        raise ConfigError(f"[model] audio_backend must be one of {', '.join(backends)}, "
                          f"got {config.model.audio_backend!r}")
    config.live.levels = _levels(config.live.levels)
    return config


def _levels(items: list) -> list:
    """[[live.levels]] tables -> [LevelConfig], checked: at least one, known keys, right types."""
    if not items:
        raise ConfigError("[live] levels needs at least one level ([[live.levels]] tables)")
    levels = []
    for i, item in enumerate(items):
        if isinstance(item, LevelConfig):
            levels.append(item)
            continue
        if not isinstance(item, dict):
            raise ConfigError(f"[live] levels[{i}] must be a table (cache, schedule, guidance, decode_every, decoder, "
                              f"share_guidance), got {item!r}")
        g = item.get("guidance")
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or g < 1.0):
            raise ConfigError(f"[live] levels[{i}] guidance must be a number >= 1.0, got {g!r}")
        levels.append(_section(LevelConfig, {k: v for k, v in item.items() if k != "guidance"}, f"live.levels[{i}]"))
        levels[-1].guidance = None if g is None else float(g)
        k = levels[-1].decode_every
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"[live] levels[{i}] decode_every must be a whole number >= 1, got {k!r}")
        if levels[-1].share_guidance and levels[-1].cache not in SYNCCACHE_METHODS:
            raise ConfigError(f"[live] levels[{i}] share_guidance is SyncCache's; cache = {levels[-1].cache!r}")
    return levels
