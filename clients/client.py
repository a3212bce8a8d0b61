"""Python WebRTC client: speak an audio file into an avatar server, record what comes back, measure it.

The file is sent as a microphone in real time (20 ms frames, Opus on the wire); the server answers with
the avatar's video and the speech, delayed to match. Every frame sent and received is stamped with
time.monotonic(), so the client measures glass to glass:

- latency: each speech onset in what was sent (its wall send time) against the first mouth opening in
  what came back (its receive time): the delay a person sees between speaking and the avatar moving.
  The global lag from cross-correlating the speech with the mouth track is reported beside it and tells
  the matcher where to look (see match_latencies);
- A/V offset: the received audio against the received video (how in sync a viewer sees them);
- ttff and fps of the received video.

Only the wire is used (HTTP signalling, WebRTC media, the "telemetry" data channel) plus small helpers:
file I/O (engine.media), loudness (engine.audio) and the lip-sync expert, which reads mouth openness from
the received frames (visual head) and from the speech (audio head).

    stats = run_client("http://127.0.0.1:8080", "speech.wav", record="seen.mp4")

Layout: the transport (PacedMic / MicTrack, the consumers, live_session: offer, connect, DELETE) is
flat and keeps what it receives in a Capture; the analysis below it reads arrays only, so a long run
(clients/soak.py) can drain the Capture every few seconds and analyse window by window.
"""
from __future__ import annotations

import asyncio
import collections
import json
import sys
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import aioice.ice
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

MIC_RATE = 48000  # what the mic track sends (aiortc's Opus encoder takes any rate)
MIC_FRAME = 960  # 20 ms at 48 kHz
REC_RATE = 16000  # received audio is kept as 16 kHz mono float32
FPS = 25  # the avatar video's frame rate
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SILENCE_DB = -100.0  # level of digital silence in engine.audio.loudness_envelope

# latency measurement
ONSET_DROP_DB = 25.0  # speech = within this many dB of the sent audio's 95th percentile level
ONSET_FLOOR_DB = -60.0  # ... and never quieter than this (dBFS)
ONSET_GAP_S = 0.2  # an onset follows at least this long below the threshold
MOUTH_CLOSED_FRAMES = 2  # a mouth opening follows at least this many closed frames
MATCH_WINDOW_S = 2.0  # a speech onset is matched to a mouth opening at most this much later
MATCH_EARLY_S = 0.16  # search from (global lag - this): shorter than ONSET_GAP_S, see match_latencies
PAUSE_MARGIN_S = 0.15  # ... or from (global lag - the pause before the onset + this), when that is earlier
MAX_LAG_S = 2.0  # global speech -> video lag searched in [0, MAX_LAG_S]
HINT_MIN_CORR = 0.5  # the global lag guides matching only when the mouth clearly follows the speech
AV_MAX_LAG_S = 0.5  # A/V offset searched in +-AV_MAX_LAG_S
GRID_HZ = 100  # wall-clock grid of the cross-correlations

CONNECT_TIMEOUT_S = 15.0
HTTP_TIMEOUT_S = 30.0


class ClientError(Exception):
    """Something the user gave or pointed at cannot be used (file, server, answer); one-line message.

    `status` is the HTTP status of a refused offer (None otherwise) and `retry_after` its Retry-After in
    seconds (a full server answers 503 with one), so a caller can tell "come back later" from a failure.
    """

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


# ------------------------------------------------------------------------------------ what is sent

class PacedMic(MediaStreamTrack):
    """A microphone made of 20 ms blocks: s16 mono 48 kHz frames, paced in real time.

    `blocks` yields int16[MIC_FRAME] arrays and is read lazily, one block per frame. The clock starts
    when the first frame is requested (aiortc's sender starts once DTLS is up); frame k is handed out at
    start + k * 20 ms, never earlier. When `blocks` runs out the track ends and `finished` is set.
    `on_sent(block, t)` hears of each block with the monotonic time it was handed to the encoder.
    """

    kind = "audio"

    def __init__(self, blocks, on_sent=None):
        super().__init__()
        self._blocks = iter(blocks)
        self._on_sent = on_sent
        self.sent = 0  # frames handed out
        self.finished = asyncio.Event()
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        k = self.sent
        block = next(self._blocks, None) if self.readyState == "live" else None
        if block is None:
            self.finished.set()
            self.stop()
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        delay = self._start + k * MIC_FRAME / MIC_RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        frame = av.AudioFrame.from_ndarray(np.asarray(block, np.int16)[None, :], format="s16", layout="mono")
        frame.sample_rate = MIC_RATE
        frame.pts, frame.time_base = k * MIC_FRAME, Fraction(1, MIC_RATE)
        self.sent = k + 1
        if self._on_sent is not None:
            self._on_sent(block, time.monotonic())
        return frame


class MicTrack(PacedMic):
    """An audio file as a microphone (see PacedMic), then `tail_s` seconds of silence so the last words
    come back; `send_times[k]` is the monotonic time frame k was handed to the encoder."""

    def __init__(self, audio: np.ndarray, tail_s: float = 1.5):
        pcm = (np.clip(np.asarray(audio, np.float32), -1, 1) * 32767).round().astype(np.int16)
        n = -(-len(pcm) // MIC_FRAME) + int(round(tail_s * MIC_RATE / MIC_FRAME))
        frames = np.zeros(n * MIC_FRAME, np.int16)
        frames[:len(pcm)] = pcm
        self.send_times: list[float] = []
        super().__init__(frames.reshape(n, MIC_FRAME), on_sent=lambda block, t: self.send_times.append(t))


# ------------------------------------------------------------------------------- what comes back

@dataclass
class Capture:
    """One session's record: what was sent and what came back, all times time.monotonic() seconds."""
    audio: np.ndarray  # float32 [S] mono at MIC_RATE: the speech sent (without the silent tail)
    send_times: list[float] = field(default_factory=list)  # per sent 20 ms frame (tail included)
    frames: list[np.ndarray] = field(default_factory=list)  # received video, uint8 [H,W,3] RGB
    frame_times: list[float] = field(default_factory=list)  # receive time per video frame
    audio_chunks: list[np.ndarray] = field(default_factory=list)  # received audio, float32 16 kHz mono
    audio_times: list[float] = field(default_factory=list)  # receive time per received audio frame
    telemetry: list = field(default_factory=list)  # data channel messages (dicts; raw text if not JSON)
    t_offer: float | None = None  # POST /offer sent
    t_connected: float | None = None  # connectionState became "connected"
    session: str | None = None
    disconnected: bool = False  # the connection failed or closed before the file was sent

    def take(self) -> "Capture":
        """What was received since the last take (frames, audio, telemetry), emptied here: a long run
        drains it every few seconds so memory stays bounded."""
        got = Capture(audio=np.zeros(0, np.float32), frames=self.frames, frame_times=self.frame_times,
                      audio_chunks=self.audio_chunks, audio_times=self.audio_times, telemetry=self.telemetry,
                      t_offer=self.t_offer, t_connected=self.t_connected, session=self.session)
        self.frames, self.frame_times, self.audio_chunks, self.audio_times, self.telemetry = [], [], [], [], []
        return got


async def _consume_video(track, cap: Capture) -> None:
    """Store every received video frame as RGB with its receive time until the track ends."""
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        cap.frame_times.append(time.monotonic())
        cap.frames.append(frame.to_ndarray(format="rgb24"))


async def _consume_audio(track, cap: Capture) -> None:
    """Store received audio as float32 16 kHz mono, one chunk per received frame, with receive times."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=REC_RATE)
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        t = time.monotonic()
        frame.pts = None  # let the resampler count samples itself
        out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        cap.audio_times.append(t)
        cap.audio_chunks.append(np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32))


def _telemetry_message(message) -> dict | str:
    """A data channel message -> the JSON object it carries (or the raw text)."""
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    try:
        return json.loads(text)
    except ValueError:
        return text


# --------------------------------------------------------------------------------- loopback ICE

_patch_depth = 0
_original_host_addresses = None


def _loopback_addresses(use_ipv4: bool = True, use_ipv6: bool = True) -> list[str]:
    """Host addresses for ICE gathering: loopback only."""
    return ["127.0.0.1"] if use_ipv4 else []


@contextmanager
def loopback_ice(enabled: bool = True):
    """While active, aioice gathers 127.0.0.1 as its only host candidate (it skips loopback otherwise).

    Reference-counted, so overlapping clients in one process restore aioice only when the last leaves.
    """
    global _patch_depth, _original_host_addresses
    if not enabled:
        yield
        return
    if _patch_depth == 0:
        _original_host_addresses = aioice.ice.get_host_addresses
        aioice.ice.get_host_addresses = _loopback_addresses
    _patch_depth += 1
    try:
        yield
    finally:
        _patch_depth -= 1
        if _patch_depth == 0:
            aioice.ice.get_host_addresses = _original_host_addresses


def loopback_candidates_only(sdp: str) -> str:
    """Drop every ICE candidate that is not on loopback, so no packet is sent to another address."""
    lines, dropped, kept = [], 0, 0
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            if len(parts) < 5 or parts[4] not in ("127.0.0.1", "::1"):
                dropped += 1
                continue
            kept += 1
        lines.append(line)
    if dropped and not kept:
        raise ClientError("the server's answer has no 127.0.0.1 ICE candidate: start it with loopback ICE "
                          "(host_candidates = [\"127.0.0.1\"], as in tests/live.toml)")
    return "\r\n".join(lines) + "\r\n"


# -------------------------------------------------------------------------------------- analysis

def speech_onsets(audio: np.ndarray, sr: int = MIC_RATE, drop_db: float = ONSET_DROP_DB,
                  gap_s: float = ONSET_GAP_S) -> np.ndarray:
    """Sample index of each speech onset in mono audio -> int64[N].

    The level is the RMS in dB of 40 ms frames; speech is a frame within `drop_db` of the 95th
    percentile level (never below ONSET_FLOOR_DB); an onset is a speech frame after at least `gap_s` of
    non-speech (the time before the file counts as silence: the mic was quiet). The onset is refined to
    the first 10 ms block above the threshold, from the second half of the frame before it.
    """
    return onsets_and_pauses(audio, sr, drop_db, gap_s)[0]


def onsets_and_pauses(audio: np.ndarray, sr: int = MIC_RATE, drop_db: float = ONSET_DROP_DB,
                      gap_s: float = ONSET_GAP_S) -> tuple[np.ndarray, np.ndarray]:
    """speech_onsets, and the silence before each onset in seconds (only what the audio shows: before the
    first sample counts as silence for the onset rule, not for its pause) -> (int64[N], float64[N])."""
    from engine.audio import loudness_envelope
    a = np.asarray(audio, np.float32).reshape(-1)
    env = loudness_envelope(a, sr, FPS)
    if env.size == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    thr = max(float(np.percentile(env, 95)) - drop_db, ONSET_FLOOR_DB)
    hop, need = sr / FPS, int(round(gap_s * FPS))
    onsets, pauses, quiet, seen = [], [], need, 0
    for i, level in enumerate(env):
        if level < thr:
            quiet += 1
            seen += 1
            continue
        if quiet >= need:
            onsets.append(_first_loud_block(a, int(round((i - 0.5) * hop)), int(round((i + 1) * hop)), thr,
                                            sr // 100, default=int(round(i * hop))))
            pauses.append(seen / FPS)
        quiet = seen = 0
    return np.asarray(onsets, np.int64), np.asarray(pauses, np.float64)


def _first_loud_block(a: np.ndarray, start: int, end: int, thr: float, block: int, default: int) -> int:
    """Start of the first `block`-sample block in a[start:end] whose RMS level reaches thr (dB)."""
    from engine.audio import level_db
    for s in range(max(start, 0), end, block):
        seg = a[s:s + block]
        if seg.size and level_db(seg) >= thr:
            return s
    return default


def sample_send_times(samples: np.ndarray, send_times, frame: int = MIC_FRAME, sr: int = MIC_RATE) -> np.ndarray:
    """Wall time each sent sample left: its 20 ms frame's send time plus its place in the frame."""
    st = np.asarray(send_times, np.float64)
    s = np.asarray(samples, np.int64)
    k = s // frame
    ok = k < len(st)
    return st[k[ok]] + (s[ok] - k[ok] * frame) / sr


def opening_threshold(openness: np.ndarray) -> float:
    """Mouth-open level: midpoint of the received track's 10th and 90th percentiles (robust to idling)."""
    lo, hi = np.percentile(np.asarray(openness, np.float64), [10, 90])
    return float((lo + hi) / 2)


def mouth_openings(openness: np.ndarray, thr: float, closed: int = MOUTH_CLOSED_FRAMES) -> np.ndarray:
    """Frame index of each mouth opening: above thr after at least `closed` frames at or below it."""
    out, run = [], closed  # before the first frame counts as closed
    for j, o in enumerate(np.asarray(openness, np.float64)):
        if o > thr:
            if run >= closed:
                out.append(j)
            run = 0
        else:
            run += 1
    return np.asarray(out, np.int64)


def _hold(times: np.ndarray, values: np.ndarray, grid: np.ndarray, before: float) -> np.ndarray:
    """Sample-and-hold: at each grid time, the value of the latest event at or before it."""
    idx = np.searchsorted(times, grid, side="right") - 1
    return np.where(idx >= 0, values[np.clip(idx, 0, None)], before)


def _grid(t0: float, t1: float) -> np.ndarray:
    """Wall-clock analysis grid from t0 to t1 at GRID_HZ (finer than the frames: no 40 ms quantisation)."""
    return t0 + np.arange(max(int((t1 - t0) * GRID_HZ) + 1, 0)) / GRID_HZ


def speech_to_video_lag(speech_track: np.ndarray, t0: float, frame_times, openness: np.ndarray,
                        max_lag_s: float = MAX_LAG_S) -> tuple[float | None, float]:
    """Global lag (s) of the received mouth track behind the sent speech -> (lag, correlation).

    `speech_track` is the openness the sent speech implies (the expert's audio head), one value per
    40 ms of the file, whose first sample left at wall time t0. Both go onto one wall-clock grid from t0
    (after the file: the track's 10th percentile, i.e. closed; the received side: the openness of the
    frame on screen, sample-and-hold by receive time). The lag in [0, max_lag_s] with the highest
    Pearson correlation wins (10 ms steps); None when nothing correlates.
    """
    from engine.lipsync import pearson
    ft = np.asarray(frame_times, np.float64)
    ref = np.asarray(speech_track, np.float64)
    if len(ft) < 3 or not ref.size:
        return None, 0.0
    grid = _grid(t0, ft[-1])
    k = np.arange(len(grid)) * FPS // GRID_HZ  # the 40 ms speech frame at each grid point
    e = np.where(k < len(ref), ref[np.minimum(k, len(ref) - 1)], np.percentile(ref, 10))
    o = _hold(ft, np.asarray(openness, np.float64), grid, float(np.percentile(openness, 10)))
    best, best_lag = 0.0, None
    for lag in range(0, int(round(max_lag_s * GRID_HZ)) + 1):
        if len(grid) - lag < 3:
            break
        c = pearson(o[lag:], e[:len(grid) - lag])
        if c > best:
            best, best_lag = c, lag
    return (None if best_lag is None else best_lag / GRID_HZ), float(best)


def match_latencies(onset_times, frame_times, openness: np.ndarray, lag_hint: float | None = None,
                    window_s: float = MATCH_WINDOW_S, early_s: float = MATCH_EARLY_S,
                    pauses=None) -> np.ndarray:
    """Glass-to-glass latency (s) of each speech onset that a mouth opening answers -> float64[M].

    For an onset sent at t_s, the answer is the first mouth opening (see mouth_openings; threshold
    from opening_threshold) received in (t_s + start, t_s + window_s], each opening answering one onset.
    start = 0 without a hint. With the global lag as a hint, start = lag_hint - early_s: when the
    latency exceeds the silence before an onset, the frames right after t_s still show the previous
    words, whose syllables open the mouth too; starting the search less than one onset gap
    (ONSET_GAP_S) before the expected answer skips them. With `pauses` (the silence before each onset,
    s) the margin is pause - PAUSE_MARGIN_S where that is more: the previous words' answers end about a
    pause before this one's, and one answer can come well before the global lag (where its onset falls
    in a 4-frame chunk), which a fixed margin would skip for the next word's opening, a second later.
    """
    ft = np.asarray(frame_times, np.float64)
    if not len(ft) or not len(onset_times):
        return np.zeros(0)
    events = ft[mouth_openings(openness, opening_threshold(openness))]
    t_on = np.asarray(onset_times, np.float64)
    gaps = np.zeros(len(t_on)) if pauses is None else np.asarray(pauses, np.float64)
    used = np.zeros(len(events), bool)
    out = []
    for j in np.argsort(t_on, kind="stable"):
        t_s = t_on[j]
        start = 0.0 if lag_hint is None else max(0.0, lag_hint - max(early_s, gaps[j] - PAUSE_MARGIN_S))
        cand = np.flatnonzero((events > t_s + start) & (events <= t_s + window_s) & ~used)
        if cand.size:
            used[cand[0]] = True
            out.append(events[cand[0]] - t_s)
    return np.asarray(out, np.float64)


def measure_latency(audio: np.ndarray, send_times, frame_times, openness: np.ndarray,
                    speech_track: np.ndarray | None = None, since: float = -np.inf,
                    until: float = np.inf) -> tuple[np.ndarray, int, float | None, float]:
    """Glass-to-glass latency of the speech onsets sent in [since, until) -> (latencies s, onsets sent,
    global lag s or None, its correlation).

    `audio` (mono, MIC_RATE) is what left in 20 ms frames at `send_times`; the received frames came at
    `frame_times` with mouth `openness`. The global lag (speech_to_video_lag) guides the matching
    (match_latencies) when it correlates at HINT_MIN_CORR or more. `speech_track` defaults to the
    expert's audio head on `audio`.
    """
    samples, pauses = onsets_and_pauses(audio)
    pauses = pauses[samples // MIC_FRAME < len(send_times)]  # as sample_send_times keeps them
    onsets = sample_send_times(samples, send_times)
    keep = (onsets >= since) & (onsets < until)
    onsets, pauses = onsets[keep], pauses[keep]
    ft = np.asarray(frame_times, np.float64)
    if not len(ft) or not len(send_times):
        return np.zeros(0), int(len(onsets)), None, 0.0
    if speech_track is None:
        speech_track = _speech_openness(audio)
    lag, corr = speech_to_video_lag(speech_track, send_times[0], ft, openness)
    lat = match_latencies(onsets, ft, openness, lag_hint=lag if corr >= HINT_MIN_CORR else None, pauses=pauses)
    return lat, int(len(onsets)), lag, corr


def audio_timeline(chunks, times, sr: int = REC_RATE, stall_s: float = 0.1,
                   player: tuple[float, int] | None = None) -> tuple[np.ndarray, float | None]:
    """Received audio chunks -> (continuous audio, monotonic time of its first sample).

    Models a player that starts at the first chunk's arrival and plays on at sr: a chunk arriving more
    than stall_s after its due time (the player ran dry) is preceded by the silence heard meanwhile.
    `player` = (t0, n) continues a player that started at t0 and has played n samples (a long run read
    piece by piece, so that no piece's first arrival jitter moves its timeline); its audio starts at
    t0 + n / sr.
    """
    if not len(chunks):
        return np.zeros(0, np.float32), None if player is None else player[0] + player[1] / sr
    t0, n = (float(times[0]), 0) if player is None else player
    start, parts = t0 + n / sr, []
    for chunk, t in zip(chunks, times):
        late = t - (t0 + n / sr)
        if late > stall_s:
            gap = int(round(late * sr))
            parts.append(np.zeros(gap, np.float32))
            n += gap
        parts.append(np.asarray(chunk, np.float32))
        n += len(chunk)
    return np.concatenate(parts), start


def align_audio(audio: np.ndarray, audio_t0: float, start_t: float, n_samples: int,
                sr: int = REC_RATE) -> np.ndarray:
    """The n_samples of audio heard from wall time start_t on (silence where none was playing)."""
    out = np.zeros(n_samples, np.float32)
    a = np.asarray(audio, np.float32)
    shift = int(round((start_t - audio_t0) * sr))  # sample of `audio` playing at start_t
    src = a[max(shift, 0):max(shift, 0) + n_samples]
    dst = max(-shift, 0)
    src = src[:max(0, n_samples - dst)]
    out[dst:dst + len(src)] = src
    return out


def av_offset(audio: np.ndarray, audio_t0: float | None, frame_times, openness: np.ndarray,
              sr: int = REC_RATE, max_lag_s: float = AV_MAX_LAG_S) -> tuple[float | None, float]:
    """Offset (ms) of the received video against the received audio -> (offset_ms, correlation).

    Sign: positive = video late (the mouth moves after the sound is heard), as `syncavatar eval`.
    On a wall-clock grid (10 ms steps) from the first frame's receive time, the openness of the frame on
    screen (sample-and-hold by receive time) is cross-correlated with the loudness (dB) of the 40 ms of
    audio playing from each grid time on, over lags of +-max_lag_s. None when nothing correlates.
    """
    from engine.audio import level_db
    from engine.lipsync import peak_corr
    ft = np.asarray(frame_times, np.float64)
    if len(ft) < 3 or audio_t0 is None or not len(audio):
        return None, 0.0
    grid = _grid(ft[0], ft[-1])
    o = _hold(ft, np.asarray(openness, np.float64), grid, float(openness[0]))
    span = sr // FPS
    env = np.empty(len(grid))
    for j, t in enumerate(grid):
        s = int(round((t - audio_t0) * sr))
        seg = audio[max(s, 0):max(s + span, 0)]
        env[j] = level_db(seg) if len(seg) else SILENCE_DB
    conf, lag = peak_corr(o, env, max_lag=int(round(max_lag_s * GRID_HZ)))
    return (lag * 1000.0 / GRID_HZ if conf > 0 else None), float(conf)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(float(x) * 1000.0, 1)


def compute_stats(cap: Capture, openness: np.ndarray | None = None,
                  speech_track: np.ndarray | None = None) -> dict:
    """The stats of one session (see run_client_async).

    `openness` (per received frame) and `speech_track` (openness implied by the sent speech, per 40 ms
    of the file) default to the lip-sync expert's visual and audio heads.
    """
    ft = np.asarray(cap.frame_times, np.float64)
    n = len(ft)
    if openness is None and n:
        from engine.lipsync import video_openness
        openness = video_openness(np.stack(cap.frames))
    openness = np.asarray(openness if openness is not None else [], np.float64)
    heard, heard_t0 = audio_timeline(cap.audio_chunks, cap.audio_times)

    lat, onsets_sent, lag, lag_corr = measure_latency(cap.audio, cap.send_times, ft, openness, speech_track)
    off, off_corr = av_offset(heard, heard_t0, ft, openness) if n else (None, 0.0)
    sync_conf, sync_off = _expert_sync(cap, heard, heard_t0, openness) if n >= 3 else (None, None)

    span = float(ft[-1] - ft[0]) if n >= 2 else 0.0
    return {
        "session": cap.session,
        "audio_s": round(len(cap.audio) / MIC_RATE, 3),
        "frames_received": n,
        "fps": round((n - 1) / span, 2) if span > 0 else None,
        "ttff_ms": _ms(ft[0] - cap.t_connected) if n and cap.t_connected is not None else None,
        "ttff_from_offer_ms": _ms(ft[0] - cap.t_offer) if n and cap.t_offer is not None else None,
        "latency_ms_p50": _ms(np.percentile(lat, 50)) if lat.size else None,
        "latency_ms_p95": _ms(np.percentile(lat, 95)) if lat.size else None,
        "latency_xcorr_ms": _ms(lag),
        "latency_xcorr_corr": round(lag_corr, 3),
        "onsets": int(lat.size),
        "onsets_sent": onsets_sent,
        "av_offset_ms": None if off is None else round(off, 1),
        "av_corr": round(off_corr, 3),
        "sync_conf": sync_conf,
        "sync_offset_ms": sync_off,
        "audio_received_s": round(len(heard) / REC_RATE, 3),
        "telemetry_messages": len(cap.telemetry),
        "chunk_kinds": chunk_kinds(cap.telemetry),
        "disconnected": cap.disconnected,
    }


def chunk_kinds(telemetry: list) -> dict:
    """How many chunks of each kind (speech, idle, skipped, late, ...) the data channel's chunk messages told."""
    return dict(collections.Counter(m.get("kind") for m in telemetry if isinstance(m, dict) and m.get("type") == "chunk"))


def _speech_openness(audio: np.ndarray) -> np.ndarray:
    """Openness the sent speech implies, one value per 40 ms of the file (the expert's audio head)."""
    from scipy.signal import resample_poly

    from engine.lipsync import audio_openness
    a16 = resample_poly(np.asarray(audio, np.float32), REC_RATE, MIC_RATE).astype(np.float32)
    return audio_openness(a16, -(-len(a16) // (REC_RATE // FPS)))


def _expert_sync(cap: Capture, heard: np.ndarray, heard_t0: float | None,
                 openness: np.ndarray) -> tuple[float | None, float | None]:
    """sync_conf and its offset (ms, positive = video late) of what a viewer saw, as `syncavatar eval`."""
    if heard_t0 is None or not cap.frames:
        return None, None
    from engine.lipsync import audio_openness, peak_corr
    T = len(cap.frames)
    audio = align_audio(heard, heard_t0, cap.frame_times[0], T * REC_RATE // FPS)
    conf, lag = peak_corr(openness, audio_openness(audio, T))
    return round(conf, 3), round(lag * 1000.0 / FPS, 1)


def write_json(path, obj: dict, what: str) -> None:
    """Write a stats / report dict as indented JSON; ClientError (one line) if the path cannot be written."""
    try:
        Path(path).write_text(json.dumps(obj, indent=1) + "\n")
    except OSError as e:
        raise ClientError(f"cannot write {what} ({e.strerror or e}): {path}") from None


def write_recording(path, cap: Capture) -> None:
    """Write what a viewer saw and heard: the received frames at 25 fps, the audio from the first frame on."""
    from engine.media import write_mp4
    if not cap.frames:
        raise ClientError(f"no video came back from the server: nothing to record in {path}")
    frames = np.stack(cap.frames)
    heard, heard_t0 = audio_timeline(cap.audio_chunks, cap.audio_times)
    audio = None
    if heard_t0 is not None:
        audio = align_audio(heard, heard_t0, cap.frame_times[0], len(frames) * REC_RATE // FPS)
    try:
        write_mp4(path, frames, fps=FPS, audio=audio, sr=REC_RATE)
    except OSError as e:
        raise ClientError(f"cannot write the recording ({e.strerror or e}): {path}") from None


# ----------------------------------------------------------------------------------- the session

def _server_url(server: str) -> tuple[str, bool]:
    """Validate the server URL -> (base URL without trailing slash, whether it is on loopback)."""
    u = urlparse(server)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ClientError(f"--server must be an http(s) URL such as http://127.0.0.1:8080, got {server!r}")
    return server.rstrip("/"), u.hostname in LOOPBACK_HOSTS


def _load_audio(path: str, duration: float | None) -> np.ndarray:
    """Decode the speech file to float32 mono 48 kHz (truncated to `duration` seconds)."""
    from engine.media import MediaError, load_audio
    if duration is not None and duration <= 0:
        raise ClientError(f"--duration must be > 0, got {duration}")
    try:
        audio = load_audio(path, MIC_RATE)
    except MediaError as e:
        raise ClientError(str(e)) from None
    return audio[:int(round(duration * MIC_RATE))] if duration is not None else audio


def _auth(token: str | None) -> dict:
    """The bearer token header (WHIP-style), or none."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the delay form; an HTTP date or garbage gives None)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


async def _post_offer(http: aiohttp.ClientSession, base: str, offer, avatar: str, token: str | None = None) -> dict:
    """POST the offer -> the answer JSON; any failure is a one-line ClientError (status, retry_after set
    when the server answered)."""
    body = {"sdp": offer.sdp, "type": offer.type, "avatar": str(avatar)}
    try:
        async with http.post(f"{base}/offer", json=body, headers=_auth(token)) as resp:
            text = await resp.text()
            status = resp.status
            retry = _retry_after(resp.headers.get("Retry-After"))
    except aiohttp.ClientConnectorError as e:
        reason = getattr(e.os_error, "strerror", None) or str(e)
        raise ClientError(f"cannot connect to the server at {base} ({reason})") from None
    except asyncio.TimeoutError:
        raise ClientError(f"the server at {base} did not answer the offer within {HTTP_TIMEOUT_S:.0f} s") from None
    except aiohttp.ClientError as e:
        raise ClientError(f"POST {base}/offer failed ({type(e).__name__}: {e})") from None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if status != 200:
        reason = data.get("error") if isinstance(data, dict) else None
        reason = reason or " ".join(text.split())[:200] or "no reason given"
        later = f"; retry after {retry:g} s" if retry is not None else ""
        raise ClientError(f"the server refused the offer (HTTP {status}): {reason}{later}", status, retry)
    if not isinstance(data, dict) or not isinstance(data.get("sdp"), str):
        raise ClientError(f"the server's answer to POST {base}/offer is not an SDP answer")
    return data


async def _delete_session(http: aiohttp.ClientSession, base: str, session: str, token: str | None = None) -> None:
    """DELETE the session; a 404 (already gone) or an unreachable server is not an error at this point."""
    try:
        async with http.delete(f"{base}/sessions/{session}", headers=_auth(token)) as resp:
            await resp.read()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        pass


@asynccontextmanager
async def live_session(base: str, loopback: bool, mic: MediaStreamTrack, cap: Capture, avatar: str = "0",
                       token: str | None = None):
    """One live session: offer, answer, connect; yields the `ended` event (set when the connection fails
    or closes) once connected. Until the block is left, what comes back goes into `cap` (video, audio,
    the telemetry data channel); then the peer connection is closed and the session DELETEd.
    """
    connected, ended = asyncio.Event(), asyncio.Event()
    consumers: list[asyncio.Task] = []
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[] if loopback else None))

    @pc.on("connectionstatechange")
    def _state():
        if pc.connectionState == "connected" and cap.t_connected is None:
            cap.t_connected = time.monotonic()
            connected.set()
        elif pc.connectionState in ("failed", "closed"):
            ended.set()

    @pc.on("track")
    def _track(track):
        consume = _consume_video if track.kind == "video" else _consume_audio
        consumers.append(asyncio.ensure_future(consume(track, cap)))

    channel = pc.createDataChannel("telemetry")
    channel.on("message", lambda m: cap.telemetry.append(_telemetry_message(m)))
    pc.addTransceiver(mic, direction="sendrecv")
    pc.addTransceiver("video", direction="recvonly")

    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            with loopback_ice(loopback):
                await pc.setLocalDescription(await pc.createOffer())  # waits for ICE gathering
            cap.t_offer = time.monotonic()
            answer = await _post_offer(http, base, pc.localDescription, avatar, token)
            cap.session = answer.get("session")
            sdp = loopback_candidates_only(answer["sdp"]) if loopback else answer["sdp"]
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
            except ValueError as e:
                raise ClientError(f"the server's answer is not a usable SDP answer ({e})") from None
            await _wait_any([connected, ended], CONNECT_TIMEOUT_S)
            if not connected.is_set():
                raise ClientError(f"no WebRTC connection to {base} (ICE/DTLS state {pc.connectionState!r} "
                                  f"after {CONNECT_TIMEOUT_S:.0f} s)")
            yield ended
        finally:
            for task in consumers:
                task.cancel()
            await pc.close()
            if cap.session:
                await _delete_session(http, base, cap.session, token)


async def _session(base: str, loopback: bool, audio: np.ndarray, avatar: str, tail_s: float,
                   token: str | None = None) -> Capture:
    """Run one live session: send the file in real time, receive until it has ended."""
    cap = Capture(audio=audio)
    mic = MicTrack(audio, tail_s)
    async with live_session(base, loopback, mic, cap, avatar, token) as ended:
        await _wait_any([mic.finished, ended], len(audio) / MIC_RATE + tail_s + 30.0)
        cap.send_times = list(mic.send_times)
        cap.disconnected = not mic.finished.is_set()
    return cap


async def _wait_any(events: list[asyncio.Event], timeout: float) -> None:
    """Wait until one of the events is set or the timeout passes."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def run_client_async(server: str, audio_path: str, record: str | None = None, avatar: str = "0",
                           duration: float | None = None, json_path: str | None = None,
                           tail_s: float = 1.5, token: str | None = None) -> dict:
    """Speak `audio_path` into the avatar server in real time, record what comes back, return the stats.

    Stats keys: session, audio_s (speech sent), frames_received, fps ((frames - 1) over the span from
    the first to the last received frame), ttff_ms (first frame after connectionState "connected"),
    ttff_from_offer_ms (after POST /offer), latency_ms_p50 / latency_ms_p95 (glass to glass over the
    matched speech onsets, see match_latencies; None if none matched), latency_xcorr_ms (the global lag
    from cross-correlation, a cross-check; it guides the matching when latency_xcorr_corr >= 0.5, i.e.
    when the mouth clearly follows the speech), onsets (matched), onsets_sent (detected in what was sent),
    av_offset_ms (received video against received audio, positive = video late; see av_offset), av_corr,
    sync_conf / sync_offset_ms (the lip-sync expert on what a viewer saw, as `syncavatar eval`),
    audio_received_s, telemetry_messages, disconnected.

    `token`: sent as `Authorization: Bearer TOKEN` on POST /offer and DELETE /sessions/{id}.
    """
    if tail_s < 0:
        raise ClientError(f"tail must be >= 0 s, got {tail_s}")
    base, loopback = _server_url(server)
    audio = _load_audio(audio_path, duration)
    cap = await _session(base, loopback, audio, avatar, tail_s, token)
    stats = compute_stats(cap)
    if json_path:
        write_json(json_path, stats, "the stats")
    if record:
        write_recording(record, cap)
    return stats


def run_client(server: str, audio_path: str, record: str | None = None, avatar: str = "0",
               duration: float | None = None, json_path: str | None = None, tail_s: float = 1.5,
               token: str | None = None) -> dict:
    """Synchronous run_client_async (see there)."""
    return asyncio.run(run_client_async(server, audio_path, record=record, avatar=avatar, duration=duration,
                                        json_path=json_path, tail_s=tail_s, token=token))


# ----------------------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    """Add the client's flags to an argparse parser."""
    parser.add_argument("--server", default="http://127.0.0.1:8080", help="avatar server URL")
    parser.add_argument("--audio", required=True, help="speech file sent as the microphone (any format)")
    parser.add_argument("--record", default=None, help="write what came back as mp4 (video + audio)")
    parser.add_argument("--json", default=None, help="write the stats JSON here too")
    parser.add_argument("--avatar", default="0", help="identity number")
    parser.add_argument("--duration", type=float, default=None, help="send only the first N seconds")
    parser.add_argument("--tail", type=float, default=1.5,
                        help="seconds of silence sent after the file so the last words come back")
    parser.add_argument("--token", default=None,
                        help="bearer token of a server that requires one ([server] token / SYNCAVATAR_TOKEN)")


def main(args) -> int:
    """Run the client from parsed arguments; print the stats JSON. Exit code 2 on a ClientError."""
    try:
        stats = run_client(args.server, args.audio, record=args.record, avatar=args.avatar,
                           duration=args.duration, json_path=args.json, tail_s=getattr(args, "tail", 1.5),
                           token=getattr(args, "token", None))
    except ClientError as e:
        print(f"syncavatar client: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=1))
    return 0
