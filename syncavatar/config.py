"""Configuration: one TOML file (configs/default.toml) read with tomllib into typed dataclasses."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

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
    noise_scale: float = 0.7  # std of the start noise


@dataclass
class EngineConfig:
    avatar: str = "0"


@dataclass
class CacheConfig:
    method: str = "synccache"  # what the live engine uses; `render` is uncached unless --cache is given
    schedule: str = "configs/synccache/ref-XS.json"  # SyncCache's offline DP schedule
    stream_schedule: str = "configs/synccache/ref-XS-stream.json"  # synccache-stream's schedule
    calibration: str = "configs/synccache/peers.json"  # TeaCache / MagCache calibration


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def path(self, p: str) -> Path:
        """Resolve a path from the config relative to the repository root."""
        q = Path(p)
        return q if q.is_absolute() else ROOT / q


def _section(cls, data: dict, name: str):
    known = {f.name: f for f in fields(cls)}
    for k, v in data.items():
        if k not in known:
            raise ConfigError(f"unknown key [{name}] {k}")
        want = type(getattr(cls(), k))
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            data = data | {k: float(v)}
        elif not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise ConfigError(f"[{name}] {k} must be {want.__name__}, got {v!r}")
    return cls(**data)


def load_config(path=DEFAULT_CONFIG) -> Config:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config is not valid TOML ({e}): {path}") from None
    sections = {"model": ModelConfig, "engine": EngineConfig, "cache": CacheConfig}
    for k in data:
        if k not in sections:
            raise ConfigError(f"unknown section [{k}] in {path}")
    return Config(**{k: _section(cls, data.get(k, {}), k) for k, cls in sections.items()})
