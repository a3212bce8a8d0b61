"""The pure parts of a live session: which audio forms chunk c and when, the backpressure policy, and the
per-chunk telemetry record.

No I/O, no threads, no clock: every time comes in as an argument, so the policy's tests run instantly and
give the same answer every time. `streaming/session.py` does the I/O around them (audio in, the worker's
callbacks, pacing, publishing).

Times: `Chunker` works in session seconds (0 = session start, input sample n captured at n / 16000);
`Backpressure` compares any one clock's seconds (the session passes monotonic ones, as the engine predicts).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from engine.audio import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME

FRAME_S = 1 / FPS


@dataclass(frozen=True)
class Chunker:
    """Chunk c covers frames [c W, (c + 1) W); its window adds look-back, look-ahead and the audio encoder's
    margin on each side. It can be generated once `lookahead_wait` frames of its look-ahead have arrived
    (at most the model's; what is missing is zeros in the window)."""
    frames: int  # W, frames per chunk
    lookback: int  # audio context before the chunk, in frames
    lookahead: int  # audio context after the chunk, in frames (the model's)
    margin: int  # extra frames decoded on each side of the window (the audio encoder's MARGIN_FRAMES)
    lookahead_wait: int  # look-ahead frames waited for
    hangover_ms: float  # speech stays on this long after VAD last heard it
    delay_s: float  # playout delay: frame i goes out at i / FPS + delay_s

    def needed(self, c: int) -> int:
        """Input samples that must have arrived before chunk c can be generated.

        The audio encoder's extra margin frame after the look-ahead is never waited for: on 8 dev clips
        sync_conf was 0.754 without it vs 0.750 with it, and it would cost 40 ms of latency.
        """
        return ((c + 1) * self.frames + min(self.lookahead_wait, self.lookahead)) * SAMPLES_PER_FRAME

    def ready_s(self, c: int) -> float:
        """Session time chunk c's audio is complete when the input arrives in real time."""
        return self.needed(c) / SAMPLE_RATE

    def deadline_s(self, c: int) -> float:
        """Session time chunk c's first frame goes out."""
        return self.delay_s + c * self.frames * FRAME_S

    def window(self, c: int) -> tuple[int, int]:
        """[start, stop) input samples of chunk c's job (the chunk starts lookback + margin frames in)."""
        first = c * self.frames
        return ((first - self.lookback - self.margin) * SAMPLES_PER_FRAME,
                (first + self.frames + self.lookahead + self.margin) * SAMPLES_PER_FRAME)

    @property
    def hangover_frames(self) -> int:
        return math.ceil(self.hangover_ms / (1000 * FRAME_S))

    def speech_span(self, c: int) -> tuple[int, int]:
        """(first frame, count) whose VAD flags decide whether chunk c is speech: its frames and look-ahead,
        and the hangover before it (speech that just stopped keeps the mouth generated)."""
        first = c * self.frames
        lo = max(0, first - self.hangover_frames)
        return lo, first + self.frames + self.lookahead - lo

    def plan(self, c: int, elapsed_s: float, speech_frames: Callable[[int, int], np.ndarray]) -> str:
        """What chunk c becomes when formed at session time elapsed_s: "late" (its frames are already
        gone: the input came after its deadline), "idle" (VAD heard no speech) or "speech" (generate it,
        at the level the policy picks). speech_frames(first, count) -> a VAD flag per frame."""
        if self.deadline_s(c) < elapsed_s:
            return "late"
        return "speech" if speech_frames(*self.speech_span(c)).any() else "idle"


@dataclass(frozen=True)
class Decision:
    """A change of the policy's level, published as a `decision` telemetry message."""
    action: str  # "raise" or "lower"
    level: int  # a cache level 0..levels-1 (higher: more reuse), or `levels`: skip (the chunk shows idle frames)
    reason: str


class Backpressure:
    """Cache level per speech chunk, on a ladder of `levels` cache levels (0: the configured plan, each
    higher one reuses more) topped by skip (level `levels`: the chunk shows idle frames). Raise to the
    lowest level predicted on time when the current one is predicted late; step back down one level
    after `recover_chunks` chunks on time (and only if the lower level would be on time too).

    A level the worker cannot keep up chunk after chunk (`keeps_up[level]` False: its round holds the
    worker longer than a chunk period) is left like a late one and never stepped down to: a chunk there
    can be on time itself and still delay every chunk after it. Stop 17, a slow CPU: the policy stepped
    down to a level whose DiT alone took 280 ms per 160 ms chunk, and the next eight chunks came late. The
    top cache level counts as kept up (above it there is only skip).

    Skip is per chunk: the next chunk tries the top cache level again. An idle worker never skips (it
    would generate nothing, and its time estimates would go stale): such a chunk is generated at the top
    cache level.
    """

    def __init__(self, levels: int, recover_chunks: int, safety_s: float = 0.0):
        if levels < 1:
            raise ValueError(f"the policy needs at least one cache level, got {levels}")
        self.recover_chunks, self.safety_s, self.skip = recover_chunks, safety_s, levels
        self.level = 0  # the level the next chunk starts from: a cache level, never skip
        self.on_time = 0  # chunks on time since the last decision, while above level 0

    def choose(self, chunk: int, deadline: float, finish: Sequence[float],
               worker_idle: bool, keeps_up: Sequence[bool] | None = None) -> tuple[int, Decision | None]:
        """-> (level for this chunk, the decision to publish or None).

        deadline: when the chunk's first frame goes out; finish[level]: when the worker would have it
        ready at each cache level if it were queued now (the same clock); it must be done safety_s early.
        keeps_up[level]: whether the worker can hold that level chunk after chunk (None: every level).
        """
        due, top = deadline - self.safety_s, self.skip - 1

        def late(level):
            return finish[min(level, top)] > due

        def unfit(level):  # late, or a level the worker cannot keep up (the top cache level always can)
            return late(level) or (keeps_up is not None and level < top and not keeps_up[level])

        level, decision = self.level, None
        if unfit(level):
            while level < self.skip and unfit(level):
                level += 1
            if level == self.skip and worker_idle:
                level = top
            why = (f"predicted {1000 * (finish[self.level] - due):.0f} ms late" if late(self.level)
                   else "its level cannot be kept up chunk after chunk")
            decision = Decision("raise", level, f"chunk {chunk} {why}")
            self.on_time = 0
        elif level > 0:
            self.on_time += 1
            if self.on_time >= self.recover_chunks and not unfit(level - 1):
                level -= 1
                decision = Decision("lower", level, f"{self.on_time} chunks on time")
                self.on_time = 0
        self.level = min(level, top)
        return level, decision


@dataclass
class ChunkRecord:
    """Telemetry of one chunk, published as a `chunk` message once its last frame went out (README's
    table). Fields that do not apply or are not known (None) are left out of the message."""
    chunk: int
    kind: str  # speech, idle, skipped, late, missing, error
    level: int | None = None
    reason: str | None = None  # why a chunk is late (input) or missing, or why its record lacks its timings
    capture_ms: float | None = None  # its first input sample arrived (session clock)
    ready_ms: float | None = None  # formed: its audio with look-ahead complete
    deadline_ms: float | None = None  # its first frame is due
    jobs_queued: int | None = None
    gen_start_ms: float | None = None
    gen_end_ms: float | None = None
    first_ready_ms: float | None = None  # its first frame was decoded (decoded before the others)
    gen_ms: float | None = None  # from the DiT stage's start to all its frames ready
    decode_ms: float | None = None  # of which the decoder stage ran this long
    computed_steps: int | None = None
    reused_steps: int | None = None
    batch: int | None = None  # chunks of sessions denoised together with it (1: alone)
    error: str | None = None
    send_ms: float | None = None  # its first frame went out
    late_frames: int | None = None  # its frames shown as idle because generation missed them
    ready_frames: int | None = None
    av_offset_ms: float | None = None
    latency_est_ms: float | None = None

    def finish(self, frames: int, transport_ms: float, video_sent: float | None, audio_sent: float | None):
        """Fill what is known once its last frame went out; *_sent: when the tracks sent its first frame
        (seconds, one clock)."""
        if self.kind == "speech" and self.late_frames == frames:
            self.kind = "late"  # generated, but none of its frames in time: the idle loop was shown
        both = video_sent is not None and audio_sent is not None
        self.av_offset_ms = round((audio_sent - video_sent) * 1000, 1) if both else 0.0
        if self.capture_ms is not None and self.send_ms is not None:
            self.latency_est_ms = round(self.send_ms - self.capture_ms + transport_ms, 1)

    def message(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def frame_kind(record: ChunkRecord | None, generated: bool) -> str:
    """Kind of an outgoing frame: "speech" if generated in time, "late" if its chunk was to be generated but
    missed it (or failed), else "idle"."""
    if generated:
        return "speech"
    return "late" if record is not None and record.kind in ("speech", "error") else "idle"
