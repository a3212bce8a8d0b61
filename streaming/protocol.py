"""What the server and the generation worker process say to each other, and what both sides agree on.

Typed messages over two multiprocessing queues (None stops either side): ChunkRequest / IdleRequest /
EndSession / ForgetIdle to the worker process; Ready / StartFailed / DitDone / FirstFrame / ChunkDone /
IdleDone back. `GenerationWorker` (streaming/worker.py) is the server's side, `streaming/worker_process.py`
the worker's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACTIVE_S = 0.4  # a session that sent a chunk this recently is expected to send the next soon


def rest_share(frames: int, decode_every: int) -> float:
    """Of a chunk's frames after the first, the share a level decodes (frames 0, k, 2k, ... for decode_every k):
    what it costs to decode, beside the first frame, against decoding every frame."""
    return (frames // decode_every - 1) / (frames - 1) if frames > 1 else 0.0


def every_frame_ms(decode_ms: float, first_ms: float, share: float) -> float:
    """A measured decode (first frames + `share` of the others, rest_share) as decoding every frame would take;
    as measured where the level decodes only first frames (share 0: nothing to scale by)."""
    return first_ms + (decode_ms - first_ms) / share if share > 0 else decode_ms


def ping_pong(i: int, n: int) -> int:
    """Index into an n-frame loop played forwards then backwards: 0..n-1, n-2..1, 0.. (never a jump)."""
    if n <= 1:
        return 0
    p = i % (2 * n - 2)
    return p if p < n else 2 * n - 2 - p


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
    gen_ms: list  # per level, ms of one chunk alone (both stages), measured at start-up
    precision: str  # "bf16" or "fp32"
    dit_ms: list  # per level, ms of the DiT stage of a batch of B = 1..max_batch chunks (B = 1 only: not batchable)
    audio_backend: str = "torch"  # the audio path's backend the worker runs (engine/audio_path.py)
    audio_backend_ms: dict = None  # auto's timings of one level-0 chunk per candidate backend, ms
    decode_ms: list = None  # ms of decoding every frame of a batch of B = 1..max_batch chunks
    first_ms: list = None  # of which the first frame of each chunk (decoded first)
    pipelined: bool = False  # decoding runs beside the next batch's DiT (DecodeStage)
    # per level, what its decoder costs against the model's own (1.0 there; [[live.levels]] decoder)
    decode_scale: list = None


@dataclass
class StartFailed:
    error: str


@dataclass
class DitDone:
    """A batch left the DiT stage: its chunks are being decoded (the next batch's DiT may start)."""
    jobs: list  # job ids of the batch
    at: float  # monotonic time its DiT stage ended
    level: int = 0  # the level it runs at (its frames decoded: [[live.levels]] decode_every)


@dataclass
class FirstFrame:
    """A chunk's first frame, decoded before the others (it is due first)."""
    job: int
    frames: np.ndarray  # uint8 [1, 128, 128, 3]
    ready: float  # monotonic time it was ready


@dataclass
class ChunkDone:
    job: int
    frames: np.ndarray | None  # None: the chunk failed (info["error"]); else the chunk's frames from `first` on
    info: dict
    first: int = 0  # frames before this index came in a FirstFrame


@dataclass
class IdleDone:
    avatar: str
    frames: np.ndarray | None
    error: str | None
