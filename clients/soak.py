"""`syncavatar soak`: N live sessions for M minutes of turn-taking speech, measured over time against the
thresholds of the config's [soak] section.

Each session (SoakClient) is the Python client's transport (clients/client.py: PacedMic, live_session)
fed by turn_taking(): utterances of a few seconds separated by 1-4 s pauses, so speech onsets keep coming
and the mouth has to close and open again. A session that drops is counted as an error and reconnected;
an offer the server turns away (503 full, 429 per-client limit) is counted as rejected and retried after
its Retry-After.

Memory stays bounded over a long run: every DIGEST_S the received frames are reduced to mouth openness
(the lip-sync expert, in a worker thread) and dropped. Each interval is analysed from that openness, the
audio sent (a window reaching CARRY_S before the interval's first onset) and the audio received in it;
then the windows move on. An onset sent in an interval's last MATCH_WINDOW_S is counted in the next
interval, once its answer has had time to arrive.

Beside the sessions: the server's ZMQ telemetry (latency_est_ms, late and dropped frames, fps_out, the
send-side A/V offset) in a thread, and GET /healthz every HEALTH_POLL_S (CPU, RSS, threads and open files
of server + generation worker).

    report = run_soak("http://127.0.0.1:8080", minutes=30, sessions=1, json_path="soak.json", plot="soak.png")
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

import aiohttp
import numpy as np
import psutil

from clients.client import (FPS, HTTP_TIMEOUT_S, MATCH_WINDOW_S, MIC_FRAME, MIC_RATE, ONSET_FLOOR_DB, REC_RATE, Capture,
                            ClientError, PacedMic, _server_url, _wait_any, audio_timeline, av_offset, live_session,
                            measure_latency, write_json)

# the speech
PAUSE_S = (1.0, 4.0)  # silence between two utterances, uniform
LEAD_S = 1.0  # silence before a session's first utterance
UTTERANCE_MAX_S = 8.0  # a longer speech file is cut into utterances ...
UTTERANCE_CUT_S = (2.5, 6.0)  # ... at its quietest 40 ms this far into each piece
SYNTH_UTTERANCES = 16  # espeak-ng utterances made when no --speech is given (1-2 sentences each)

# the measurement
DIGEST_S = 5.0  # received frames -> mouth openness, then dropped (128x128 RGB at 25 fps: ~1.2 MB/s)
HEALTH_POLL_S = 5.0  # GET /healthz period
INTERVALS = 8  # auto interval: the run in about this many, each within INTERVAL_S
INTERVAL_S = (10.0, 60.0)
CARRY_S = 1.0  # sent audio and frames kept from before an interval's first onset (its pause, the lag's grid)
FIRST_FRAME_GRACE_S = 2.0  # a connection counts for fps from its first frame, or this long after connecting
EDGE_S = 300.0  # latency: the first and last 5 minutes ...
AV_EDGE_S = 60.0  # A/V offset: the first and last minute ...
EDGE_FRACTION = 0.2  # ... or the first and last fifth of a shorter run
REJECT_STATUS = (503, 429)  # turned away for now (full, per-client limit): retried after Retry-After
DEFAULT_RETRY_S = 5.0  # when a 503 or 429 has no Retry-After
RECONNECT_S = 2.0  # after a failed connect or a dropped session
SETTLE_S = 3.0  # after the sessions closed, before the last /healthz (threads and files after the run)


# ------------------------------------------------------------------------------------------ speech

def speech_files(spec: str) -> list[Path]:
    """--speech: one audio file, or every .wav in a directory (sorted)."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(p.glob("*.wav"))
        if not files:
            raise ClientError(f"no .wav files in --speech directory {p}")
        return files
    if not p.exists():
        raise ClientError(f"--speech file not found: {p}")
    return [p]


def synthesize_speech(out_dir, n: int = SYNTH_UTTERANCES) -> list[Path]:
    """Held-out espeak-ng voices saying held-out sentences (engine.data.corpus: never in training), one or
    two sentences a file, at varied speeds -> wav paths."""
    from engine.data.corpus import HELDOUT_LANGS, HELDOUT_SENTENCES, HELDOUT_VARIANTS
    if shutil.which("espeak-ng") is None:
        raise ClientError("espeak-ng makes the soak's speech: install it (apt-get install espeak-ng) or pass --speech")
    paths = []
    for i in range(n):
        voice = HELDOUT_LANGS[i % len(HELDOUT_LANGS)] + HELDOUT_VARIANTS[i % len(HELDOUT_VARIANTS)]
        text = " ".join(HELDOUT_SENTENCES[(2 * i + j) % len(HELDOUT_SENTENCES)] for j in range(1 + i % 2))
        path = Path(out_dir) / f"utterance_{i:02d}.wav"
        r = subprocess.run(["espeak-ng", "-v", voice, "-s", str(140 + (7 * i) % 40), "-w", str(path), text],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise ClientError(f"espeak-ng failed for voice {voice}: {r.stderr.strip()[:200]}")
        paths.append(path)
    return paths


def split_utterances(audio: np.ndarray, sr: int = MIC_RATE) -> list[np.ndarray]:
    """Mono audio -> utterances: cut in the middle of the quietest 200 ms within UTTERANCE_CUT_S of each
    piece's start while more than UTTERANCE_MAX_S is left; pieces without speech (never above
    ONSET_FLOOR_DB) dropped."""
    from engine.audio import loudness_envelope
    a = np.asarray(audio, np.float32).reshape(-1)
    env, hop = loudness_envelope(a, sr, FPS), sr // FPS
    loud = np.max([np.roll(env, k) for k in range(-2, 3)], axis=0)  # loudest 40 ms within +-80 ms
    cuts, start = [0], 0  # in samples
    while len(a) - start > UTTERANCE_MAX_S * sr:
        lo = (start // hop) + int(UTTERANCE_CUT_S[0] * FPS)
        hi = (start // hop) + int(UTTERANCE_CUT_S[1] * FPS)
        start = (lo + int(np.argmin(loud[lo:hi]))) * hop + hop // 2
        cuts.append(start)
    cuts.append(len(a))
    pieces = [a[s:e] for s, e in zip(cuts, cuts[1:])]
    return [p for p in pieces if len(p) and loudness_envelope(p, sr, FPS).max() > ONSET_FLOOR_DB]


def load_utterances(paths) -> list[np.ndarray]:
    """Speech files -> utterances as int16 48 kHz mono, padded to whole 20 ms frames (see split_utterances)."""
    from engine.media import MediaError, load_audio
    out = []
    for path in paths:
        try:
            audio = load_audio(path, MIC_RATE)
        except MediaError as e:
            raise ClientError(str(e)) from None
        for u in split_utterances(audio):
            pcm = np.zeros(-(-len(u) // MIC_FRAME) * MIC_FRAME, np.int16)
            pcm[:len(u)] = (np.clip(u, -1, 1) * 32767).round().astype(np.int16)
            out.append(pcm)
    if not out:
        raise ClientError("the --speech files hold no speech (all silent)")
    return out


def turn_taking(utterances: list[np.ndarray], rng: np.random.Generator, speak_until: float | None = None,
                lead_s: float = LEAD_S):
    """Endless 20 ms int16 blocks: silence, an utterance, a PAUSE_S pause, another utterance, ...

    Utterances are drawn at random; one that would end after `speak_until` (monotonic) is replaced by
    silence, so the run's last onsets are answered before it ends. Read lazily, one block per 20 ms.
    """
    silence = np.zeros(MIC_FRAME, np.int16)
    yield from [silence] * int(round(lead_s * MIC_RATE / MIC_FRAME))
    while True:
        u = utterances[int(rng.integers(len(utterances)))]
        if speak_until is None or time.monotonic() + len(u) / MIC_RATE < speak_until:
            yield from u.reshape(-1, MIC_FRAME)
        yield from [silence] * int(round(rng.uniform(*PAUSE_S) * MIC_RATE / MIC_FRAME))


# --------------------------------------------------------------------------------- one session

def covered_s(spans, a: float, b: float) -> float:
    """Seconds of [a, b) during which a connection was delivering video (spans: [t_connected, first frame
    or None, end or None]; a connection counts from its first frame, or FIRST_FRAME_GRACE_S after it
    connected if no frame came by then)."""
    total = 0.0
    for t_conn, first, end in spans:
        s = min(first if first is not None else np.inf, t_conn + FIRST_FRAME_GRACE_S)
        e = end if end is not None else b
        total += max(0.0, min(e, b) - max(s, a))
    return total


def analyse_window(sent_t, sent_pcm, seen_t, seen_o, heard, heard_t0, spans, a: float, b: float,
                   since: float, until: float) -> dict:
    """One session's interval [a, b) -> fps, latencies of the onsets sent in [since, until), A/V offset.

    sent_t / sent_pcm: the 20 ms int16 blocks sent and when; seen_t / seen_o: receive time and mouth
    openness of the frames received; heard: the audio a player played in the interval (16 kHz, see
    audio_timeline), from monotonic time heard_t0.
    """
    seen_t, seen_o = np.asarray(seen_t, np.float64), np.asarray(seen_o, np.float64)
    iv = (seen_t >= a) & (seen_t < b)
    n = int(iv.sum())
    cov = covered_s(spans, a, b)
    out = {"frames": n, "fps": round(n / cov, 2) if cov >= 1.0 else None, "latencies_ms": [], "onsets_sent": 0,
           "latency_xcorr_ms": None, "av_offset_ms": None, "av_corr": 0.0}
    if len(sent_t):
        audio = np.concatenate(sent_pcm).astype(np.float32) / 32767.0
        keep = seen_t >= sent_t[0]
        lat, out["onsets_sent"], lag, _ = measure_latency(audio, np.asarray(sent_t), seen_t[keep], seen_o[keep],
                                                          since=since, until=until)
        out["latencies_ms"] = [round(float(x) * 1000, 1) for x in lat]
        out["latency_xcorr_ms"] = None if lag is None else round(lag * 1000, 1)
    if n >= 3 and heard_t0 is not None:
        off, corr = av_offset(np.asarray(heard, np.float32), heard_t0, seen_t[iv], seen_o[iv])
        out["av_offset_ms"], out["av_corr"] = (None if off is None else round(off, 1)), round(corr, 3)
    return out


class SoakClient:
    """One soak session for the whole run (reconnected when it drops), holding only a short window."""

    def __init__(self, label: str, base: str, loopback: bool, utterances, seed: int, avatar: str = "0",
                 token: str | None = None, speak_until: float | None = None, say=None):
        self.label, self.base, self.loopback, self.avatar, self.token = label, base, loopback, avatar, token
        self.utterances, self.rng, self.speak_until = utterances, np.random.default_rng(seed), speak_until
        self.say = say or _say
        self.cap: Capture | None = None  # the current connection's
        self.span: list | None = None  # [t_connected, first frame, end] of the current connection
        self._retired: list = []  # (what a closed connection received last, its span), for the next take
        self.spans: list[list] = []
        self.sent: collections.deque = collections.deque()  # (send time, int16 block)
        self.seen_t, self.seen_o = np.zeros(0), np.zeros(0, np.float32)  # received frames, digested
        self.heard: list[np.ndarray] = []  # received audio as a player played it, since the last interval
        self.heard_t0: float | None = None  # ... from this monotonic time
        self.player: tuple | None = None  # (span, t0, samples played) of the current connection's player
        self.onsets_from = -np.inf
        self.sessions: list[str] = []  # the server's session ids, one per connection
        self.errors: collections.Counter = collections.Counter()
        self.rejected: collections.Counter = collections.Counter()

    def _on_sent(self, block, t: float) -> None:
        self.sent.append((t, block))

    async def run(self, stop: asyncio.Event, deadline: float) -> None:
        """Connect, stream until `stop`, reconnect on a drop or a refusal (after Retry-After)."""
        told = set()
        while not stop.is_set():
            cap = Capture(audio=np.zeros(0, np.float32))
            mic = PacedMic(turn_taking(self.utterances, self.rng, self.speak_until), on_sent=self._on_sent)
            wait = 0.0
            try:
                async with live_session(self.base, self.loopback, mic, cap, self.avatar, self.token) as ended:
                    self.cap, self.span = cap, [cap.t_connected, None, None]
                    self.spans.append(self.span)
                    self.sessions.append(cap.session)
                    try:
                        await _wait_any([ended, stop], max(deadline - time.monotonic(), 0) + 60)
                    finally:
                        self.span[2] = time.monotonic()
                        self._retired.append((cap.take(), self.span))
                        self.cap = self.span = None
                    if not stop.is_set():
                        self.errors["disconnects"] += 1
                        self.say(f"{self.label}: session {cap.session} ended by the server or the network; "
                                 "reconnecting")
                        wait = RECONNECT_S
            except ClientError as e:
                if e.status in REJECT_STATUS:
                    self.rejected[e.status] += 1
                    wait = e.retry_after if e.retry_after is not None else DEFAULT_RETRY_S
                    if e.status not in told:
                        told.add(e.status)
                        self.say(f"{self.label}: {e} (retrying every {wait:g} s)")
                else:
                    self.errors["connect_failed"] += 1
                    self.say(f"{self.label}: {e}")
                    wait = RECONNECT_S
            except Exception as e:  # aiortc / aiohttp surprises: counted, and the session is tried again
                self.errors["session_failed"] += 1
                self.say(f"{self.label}: session failed ({type(e).__name__}: {e})")
                wait = RECONNECT_S
            if wait:
                await _wait_any([stop], wait)

    def take(self) -> tuple[list[float], list[np.ndarray]]:
        """Everything received since the last take -> (frame times, frames); the audio goes on playing
        into `heard` (one player per connection: a new connection restarts it, and `heard` with it)."""
        got = self._retired + ([(self.cap.take(), self.span)] if self.cap is not None else [])
        self._retired = []
        ft, frames = [], []
        for cap, span in got:
            if cap.frame_times and span[1] is None:
                span[1] = cap.frame_times[0]
            ft += cap.frame_times
            frames += cap.frames
            if not cap.audio_chunks:
                continue
            if self.player is None or self.player[0] is not span:
                self.player, self.heard, self.heard_t0 = (span, None, 0), [], None
            _, t0, n = self.player
            audio, start = audio_timeline(cap.audio_chunks, cap.audio_times,
                                          player=None if t0 is None else (t0, n))
            self.player = (span, start if t0 is None else t0, n + len(audio))
            self.heard_t0 = start if self.heard_t0 is None else self.heard_t0
            self.heard.append(audio)
        return ft, frames

    def absorb(self, frame_times, openness) -> None:
        """Add digested frames (their openness) to the window."""
        self.seen_t = np.concatenate([self.seen_t, np.asarray(frame_times, np.float64)])
        self.seen_o = np.concatenate([self.seen_o, np.asarray(openness, np.float32)])

    def window(self, a: float, b: float, final: bool) -> dict:
        """analyse_window's arguments for the interval [a, b) (the last interval takes every onset)."""
        sent = list(self.sent)
        heard = np.concatenate(self.heard) if self.heard else np.zeros(0, np.float32)
        return {"sent_t": [t for t, _ in sent], "sent_pcm": [p for _, p in sent], "seen_t": self.seen_t,
                "seen_o": self.seen_o, "heard": heard, "heard_t0": self.heard_t0,
                "spans": [list(s) for s in self.spans],
                "a": a, "b": b, "since": self.onsets_from, "until": b if final else b - MATCH_WINDOW_S}

    def advance(self, until: float) -> None:
        """After an interval: keep only what the next needs (from CARRY_S before its first onset)."""
        self.onsets_from = until
        keep = until - CARRY_S
        while self.sent and self.sent[0][0] < keep:
            self.sent.popleft()
        k = int(np.searchsorted(self.seen_t, keep))
        self.seen_t, self.seen_o = self.seen_t[k:], self.seen_o[k:]
        if self.player is not None:  # the next interval's audio starts where this one's ended
            _, t0, n = self.player
            self.heard, self.heard_t0 = [], t0 + n / REC_RATE
        self.spans = [s for s in self.spans if s[2] is None or s[2] >= keep]


# ------------------------------------------------------------------------------- around the sessions

class TelemetryTap:
    """streaming.telemetry.messages in a daemon thread; messages pile up until take()."""

    def __init__(self, address: str):
        self.address = address
        self._q: collections.deque = collections.deque()
        self._stop = threading.Event()
        self.error: Exception | None = None
        self.count = 0
        self._thread = threading.Thread(target=self._run, name="soak-telemetry", daemon=True)
        self._thread.start()

    def _run(self):
        from streaming.telemetry import messages
        try:
            for m in messages(self.address, poll_s=0.2):
                if self._stop.is_set():
                    return
                if m is not None:
                    self._q.append(m)
                    self.count += 1
        except Exception as e:  # a bad address: reported by the driver
            self.error = e

    def take(self) -> list[dict]:
        out = []
        while self._q:
            out.append(self._q.popleft())
        return out

    def close(self):
        self._stop.set()
        self._thread.join(2.0)


def telemetry_stats(messages, labels: dict, counters: dict) -> dict:
    """An interval's telemetry of our sessions (`labels`: session id -> label) -> its figures.

    late_frames and dropped_late are cumulative per session in the `second` messages; `counters` keeps
    each session's last value, so the interval gets the increase (robust to a dropped message).
    """
    est, av, fps_out, kinds = [], [], [], collections.Counter()
    late = dropped = errors = 0
    for m in messages:
        sid = m.get("session")
        if sid not in labels:
            continue
        if m.get("type") == "chunk":
            if m.get("kind") == "speech" and m.get("latency_est_ms") is not None:
                est.append(float(m["latency_est_ms"]))
            if m.get("av_offset_ms") is not None:
                av.append(float(m["av_offset_ms"]))
            errors += m.get("kind") == "error"
            kinds[m.get("kind")] += 1
        elif m.get("type") == "second":
            if m.get("fps_out") is not None:
                fps_out.append(float(m["fps_out"]))
            for key in ("late_frames", "dropped_late"):
                v = m.get(key)
                if v is not None and v > counters.get((sid, key), 0):
                    if key == "late_frames":
                        late += v - counters.get((sid, key), 0)
                    else:
                        dropped += v - counters.get((sid, key), 0)
                    counters[(sid, key)] = v
    return {"latency_est_ms": est, "latency_est_ms_p50": _pct(est, 50), "latency_est_ms_p95": _pct(est, 95),
            "latency_est_n": len(est), "fps_out_min": min(fps_out) if fps_out else None,
            "late_frames": late, "dropped_late": dropped, "send_av_offset_ms": _pct(av, 50), "session_errors": errors,
            "chunks_speech": kinds["speech"], "chunks_skipped": kinds["skipped"], "chunks_late": kinds["late"]}


def health_stats(samples) -> dict:
    """An interval's /healthz samples -> median RSS, threads, open files; mean CPU (each sample's CPU is
    since the previous one)."""
    procs = [s["process"] for s in samples if isinstance(s, dict) and isinstance(s.get("process"), dict)]

    def med(key):
        v = [p[key] for p in procs if p.get(key) is not None]
        return round(float(np.median(v)), 1) if v else None
    cpu = [p["cpu_percent"] for p in procs if p.get("cpu_percent") is not None]
    return {"rss_mb": med("rss_mb"), "threads": med("threads"), "open_files": med("open_files"),
            "cpu_percent": round(float(np.mean(cpu)), 1) if cpu else None, "health_samples": len(procs)}


async def _health(http: aiohttp.ClientSession, base: str) -> dict | None:
    """GET /healthz -> its JSON, or None when it does not answer."""
    try:
        async with http.get(f"{base}/healthz") as resp:
            return await resp.json() if resp.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None


# ----------------------------------------------------------------------------------------- report

def _pct(values, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


def _growth_pct(first, last) -> float | None:
    return None if first in (None, 0) or last is None else round((last - first) / first * 100.0, 2)


def edge_window_s(run_s: float, want_s: float) -> float:
    """The first/last window: want_s, or a fifth of a run too short for it."""
    return min(want_s, EDGE_FRACTION * run_s)


def _edges(timeline: list[dict], window_s: float) -> tuple[list[dict], list[dict]]:
    """The intervals that end within window_s of the start, and those that begin within it of the end
    (at least the first and the last interval)."""
    t0, t1 = timeline[0]["t0_s"], timeline[-1]["t1_s"]
    first = [iv for iv in timeline if iv["t1_s"] <= t0 + window_s + 1e-6] or timeline[:1]
    last = [iv for iv in timeline if iv["t0_s"] >= t1 - window_s - 1e-6] or timeline[-1:]
    return first, last


def _median_of(intervals, key) -> float | None:
    v = [iv[key] for iv in intervals if iv.get(key) is not None]
    return round(float(np.median(v)), 1) if v else None


def _mean_of(intervals, key) -> float | None:
    v = [iv[key] for iv in intervals if iv.get(key) is not None]
    return round(float(np.mean(v)), 1) if v else None


def summarize(timeline: list[dict], thresholds: dict, latency_est_ms=None, errors_detail: dict | None = None,
              rejected_by_status: dict | None = None, before: dict | None = None, after: dict | None = None) -> dict:
    """The run's report from its per-interval timeline (see interval_record) and the [soak] thresholds.

    Latency: pooled over the run and over its first and last edge window (5 minutes, or a fifth of a
    shorter run: `latency_edge_s`). A/V drift: the median offset of the last minute minus the first
    (`av_edge_s`, the same rule). Resources: the first interval is the warm-up; growth is from the next
    one to the last. `broken` names the thresholds broken (`broken_detail`: why).
    """
    if not timeline:
        raise ValueError("no interval was measured")
    run_s = timeline[-1]["t1_s"] - timeline[0]["t0_s"]
    lat = [x for iv in timeline for x in iv["latencies_ms"]]
    lat_edge = edge_window_s(run_s, EDGE_S)
    first, last = _edges(timeline, lat_edge)
    p95_first = _pct([x for iv in first for x in iv["latencies_ms"]], 95)
    p95_last = _pct([x for iv in last for x in iv["latencies_ms"]], 95)
    av_edge = edge_window_s(run_s, AV_EDGE_S)
    av_first, av_last = (_median_of(ivs, "av_offset_ms") for ivs in _edges(timeline, av_edge))
    if latency_est_ms is None:  # without the raw values: the intervals' medians
        latency_est_ms = [iv["latency_est_ms_p50"] for iv in timeline if iv.get("latency_est_ms_p50") is not None]
    base = timeline[1] if len(timeline) >= 3 else timeline[0]  # after the warm-up interval
    end = timeline[-1]

    def growth(key):
        return None if base.get(key) is None or end.get(key) is None else round(end[key] - base[key], 1)
    fps = [iv["fps_min"] for iv in timeline if iv.get("fps_min") is not None]
    if errors_detail is None:
        errors_detail = {"in_intervals": sum(iv["errors"] for iv in timeline)}
    rejected_by_status = dict(rejected_by_status or {})
    report = {
        "run_s": round(run_s, 1),
        "intervals": len(timeline),
        "interval_s": round(run_s / len(timeline), 1),
        "latency_ms_p50": _pct(lat, 50), "latency_ms_p95": _pct(lat, 95), "latency_ms_p99": _pct(lat, 99),
        "onsets": len(lat), "onsets_sent": sum(iv["onsets_sent"] for iv in timeline),
        "latency_ms_p95_first5": p95_first, "latency_ms_p95_last5": p95_last,
        "latency_p95_growth_pct": _growth_pct(p95_first, p95_last),
        "latency_edge_s": round(lat_edge, 1),
        "latency_edge_note": ("first and last 5 minutes" if lat_edge >= EDGE_S else
                              f"run shorter than 25 minutes: first and last fifth ({lat_edge:.0f} s)"),
        "latency_est_ms_p50": _pct(latency_est_ms, 50), "latency_est_ms_p95": _pct(latency_est_ms, 95),
        "av_offset_ms_first": av_first, "av_offset_ms_last": av_last,
        "av_drift_ms": None if av_first is None or av_last is None else round(av_last - av_first, 1),
        "av_edge_s": round(av_edge, 1),
        "rss_mb_start": base.get("rss_mb"), "rss_mb_end": end.get("rss_mb"),
        "rss_growth_pct": _growth_pct(base.get("rss_mb"), end.get("rss_mb")),
        "threads_start": base.get("threads"), "threads_end": end.get("threads"), "threads_growth": growth("threads"),
        "open_files_start": base.get("open_files"), "open_files_end": end.get("open_files"),
        "open_files_growth": growth("open_files"),
        "cpu_percent_mean": _mean_of(timeline, "cpu_percent"),
        "fps_min": min(fps) if fps else None,
        "late_frames": sum(iv.get("late_frames") or 0 for iv in timeline),
        "dropped_late": sum(iv.get("dropped_late") or 0 for iv in timeline),
        "chunks_speech": sum(iv.get("chunks_speech") or 0 for iv in timeline),
        "chunks_skipped": sum(iv.get("chunks_skipped") or 0 for iv in timeline),  # the policy skipped them (its top level)
        "chunks_late": sum(iv.get("chunks_late") or 0 for iv in timeline),
        "errors": sum(errors_detail.values()), "errors_detail": errors_detail,
        "rejected": sum(rejected_by_status.values()), "rejected_by_status": rejected_by_status,
        "before": before, "after": after,
        "timeline": timeline,
    }
    report["thresholds"] = dict(thresholds)
    broken = check_thresholds(report, thresholds)
    report["broken"], report["broken_detail"] = list(broken), broken
    return report


def check_thresholds(report: dict, t: dict) -> dict:
    """{threshold name: why it is broken} for each [soak] threshold the report breaks; one that could not
    be measured counts as broken (a soak that cannot see something must not pass it)."""
    r = report
    checks = [  # (threshold, measured value, broken?, why if not measured, why broken)
        ("latency_p95_growth_pct", r["latency_p95_growth_pct"], lambda g, lim: g > lim,
         "no latency measured in the first or the last window (no onset answered)",
         lambda g, lim: f"p95 latency {r['latency_ms_p95_last5']:g} ms in the last {r['latency_edge_s']:g} s vs "
                        f"{r['latency_ms_p95_first5']:g} ms in the first: {g:+.1f}% (limit {lim:g}%)"),
        ("av_drift_ms", r["av_drift_ms"], lambda d, lim: abs(d) > lim,
         "no A/V offset measured in the first or the last window",
         lambda d, lim: f"A/V offset {r['av_offset_ms_first']:g} -> {r['av_offset_ms_last']:g} ms: "
                        f"drift {d:+g} ms (limit {lim:g} ms)"),
        ("rss_growth_pct", r["rss_growth_pct"], lambda g, lim: g > lim,
         "no RSS from /healthz (its \"process\" figures)",
         lambda g, lim: f"server + worker RSS {r['rss_mb_start']:g} -> {r['rss_mb_end']:g} MB: "
                        f"{g:+.1f}% (limit {lim:g}%)"),
        ("threads_growth", r["threads_growth"], lambda g, lim: g > lim, "no thread count from /healthz",
         lambda g, lim: f"server + worker threads {r['threads_start']:g} -> {r['threads_end']:g} "
                        f"(+{g:g}, limit {lim:g})"),
        ("open_files_growth", r["open_files_growth"], lambda g, lim: g > lim, "no open-file count from /healthz",
         lambda g, lim: f"server + worker open files +{g:g} (limit {lim:g})"),
        ("min_fps", r["fps_min"], lambda f, lim: f < lim, "no session received video",
         lambda f, lim: f"a session received {f:g} fps in one interval (limit {lim:g})"),
        ("max_errors", r["errors"], lambda e, lim: e > lim, "no error count",
         lambda e, lim: f"{e} errors ({', '.join(f'{k} {v}' for k, v in r['errors_detail'].items() if v)}; "
                        f"limit {lim})"),
    ]
    out = {}
    for name, value, broken, missing, why in checks:
        if value is None:
            out[name] = missing
        elif broken(value, t[name]):
            out[name] = why(value, t[name])
    return out


def verdict(report: dict, out=None) -> int:
    """Print one line per broken threshold; the exit code: 1 if any is broken, else 0."""
    out = out or sys.stdout
    for name, why in report["broken_detail"].items():
        print(f"BROKEN {name}: {why}", file=out, flush=True)
    return 1 if report["broken"] else 0


def interval_record(t0_s: float, t1_s: float, per_session: dict, tele: dict, health: dict, errors: int,
                    rejected: int) -> dict:
    """One timeline entry: the interval [t0_s, t1_s) (seconds since the soak started) over all sessions."""
    lat = [x for s in per_session.values() for x in s["latencies_ms"]]
    fps = {k: s["fps"] for k, s in per_session.items() if s["fps"] is not None}
    offs = {k: s["av_offset_ms"] for k, s in per_session.items() if s["av_offset_ms"] is not None}
    lags = [s["latency_xcorr_ms"] for s in per_session.values() if s["latency_xcorr_ms"] is not None]
    return {"t0_s": round(t0_s, 1), "t1_s": round(t1_s, 1), "sessions_receiving": len(fps),
            "latency_ms_p50": _pct(lat, 50), "latency_ms_p95": _pct(lat, 95), "latency_ms_p99": _pct(lat, 99),
            "latencies_ms": lat, "onsets_sent": sum(s["onsets_sent"] for s in per_session.values()),
            "latency_xcorr_ms": _pct(lags, 50),
            "latency_est_ms_p50": tele.get("latency_est_ms_p50"), "latency_est_ms_p95": tele.get("latency_est_ms_p95"),
            "latency_est_n": tele.get("latency_est_n", 0),
            "fps": fps, "fps_min": min(fps.values()) if fps else None, "fps_out_min": tele.get("fps_out_min"),
            "late_frames": tele.get("late_frames"), "dropped_late": tele.get("dropped_late"),
            "chunks_speech": tele.get("chunks_speech"), "chunks_skipped": tele.get("chunks_skipped"),
            "chunks_late": tele.get("chunks_late"),
            "av_offset_ms": _pct(list(offs.values()), 50), "av_offset_ms_by_session": offs,
            "send_av_offset_ms": tele.get("send_av_offset_ms"),
            "rss_mb": health.get("rss_mb"), "cpu_percent": health.get("cpu_percent"),
            "threads": health.get("threads"), "open_files": health.get("open_files"),
            "errors": errors, "rejected": rejected}


def progress_line(iv: dict, minutes: float, sessions: int) -> str:
    """One short line per interval."""
    def f(v, fmt="{:.0f}"):
        return "-" if v is None else fmt.format(v)
    return (f"[{iv['t1_s'] / 60:5.1f}/{minutes:g} min] sessions {iv['sessions_receiving']}/{sessions} | "
            f"latency p50 {f(iv['latency_ms_p50'])} p95 {f(iv['latency_ms_p95'])} ms "
            f"(n {len(iv['latencies_ms'])}, est {f(iv['latency_est_ms_p50'])}) | "
            f"fps min {f(iv['fps_min'], '{:.1f}')} | "
            f"late {f(iv['late_frames'])} dropped {f(iv['dropped_late'])} skipped {f(iv['chunks_skipped'])} | A/V {f(iv['av_offset_ms'])} ms | "
            f"RSS {f(iv['rss_mb'])} MB cpu {f(iv['cpu_percent'])}% threads {f(iv['threads'])} "
            f"files {f(iv['open_files'])} | errors {iv['errors']} rejected {iv['rejected']}")


def plot_report(report: dict, path) -> None:
    """Panels against time: latency (client p50/p95, telemetry estimate), fps per session, RSS and
    threads, A/V offset (received, and the server's send offset)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tl = report["timeline"]
    x = [(iv["t0_s"] + iv["t1_s"]) / 120 for iv in tl]  # interval midpoints, minutes

    def col(key):
        return [np.nan if iv.get(key) is None else iv[key] for iv in tl]
    fig, ax = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    ax[0].plot(x, col("latency_ms_p50"), "o-", label="client p50")
    ax[0].plot(x, col("latency_ms_p95"), "s-", label="client p95")
    ax[0].plot(x, col("latency_est_ms_p50"), "^--", label="telemetry latency_est p50")
    ax[0].set_ylabel("latency (ms)\nspeech onset -> mouth")
    labels = sorted({k for iv in tl for k in iv["fps"]})
    for k in labels:
        ax[1].plot(x, [iv["fps"].get(k, np.nan) for iv in tl], "o-", label=f"session {k}")
    ax[1].axhline(report["thresholds"]["min_fps"], color="r", ls=":", lw=1, label="min_fps")
    ax[1].plot(x, col("fps_out_min"), "x:", color="gray", label="server fps_out (min)")
    ax[1].set_ylabel("fps received")
    ax[2].plot(x, col("rss_mb"), "o-", color="C0", label="RSS")
    ax[2].set_ylabel("RSS server + worker (MB)", color="C0")
    twin = ax[2].twinx()
    twin.plot(x, col("threads"), "s--", color="C3", label="threads")
    twin.set_ylabel("threads", color="C3")
    ax[3].plot(x, col("av_offset_ms"), "o-", label="received (+ = video late)")
    ax[3].plot(x, col("send_av_offset_ms"), "^--", label="server send offset")
    ax[3].set_ylabel("A/V offset (ms)")
    ax[3].set_xlabel("minutes")
    for a in ax:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8, loc="best")
    broken = ", ".join(report["broken"]) or "none"
    fig.suptitle(f"soak: {report.get('sessions', '?')} session(s), {report['run_s'] / 60:.1f} min; broken: {broken}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- driver

def auto_interval_s(run_s: float) -> float:
    """About INTERVALS intervals, each within INTERVAL_S (a 2-minute run: 15 s; 30 minutes: 60 s)."""
    return float(np.clip(run_s / INTERVALS, *INTERVAL_S))


def _openness(frames: list[np.ndarray]) -> np.ndarray:
    from engine.lipsync import video_openness
    return video_openness(np.stack(frames)) if frames else np.zeros(0, np.float32)


class _Run:
    """The soak's state between intervals: the clients, the telemetry tap, the /healthz samples, counters."""

    def __init__(self, clients, tap, base: str, http: aiohttp.ClientSession, stop: asyncio.Event):
        self.clients, self.tap, self.base, self.http, self.stop = clients, tap, base, http, stop
        self.loop = asyncio.get_running_loop()
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="soak-analysis")
        self.samples: list[dict] = []
        self.health_failed = 0
        self.counters: dict = {}  # telemetry's cumulative counters per session
        self.latency_est_ms: list[float] = []
        self.errors_seen = self.rejected_seen = 0

    async def poll_health(self) -> None:
        while not self.stop.is_set():
            h = await _health(self.http, self.base)
            if h is None:
                self.health_failed += 1
            else:
                self.samples.append(h)
            await _wait_any([self.stop], HEALTH_POLL_S)

    async def digest(self) -> None:
        """Received frames -> openness (worker thread), then dropped."""
        for c in self.clients:
            ft, frames = c.take()
            op = await self.loop.run_in_executor(self.pool, _openness, frames)
            c.absorb(ft, op)

    async def interval(self, a: float, b: float, final: bool, t0: float) -> dict:
        """Analyse [a, b) (monotonic) for every session, with its telemetry and /healthz -> timeline entry."""
        per_session = {}
        for c in self.clients:
            w = c.window(a, b, final)
            per_session[c.label] = await self.loop.run_in_executor(self.pool, lambda w=w: analyse_window(**w))
            c.advance(w["until"])
        labels = {sid: c.label for c in self.clients for sid in c.sessions}
        tele = telemetry_stats(self.tap.take() if self.tap else [], labels, self.counters)
        self.latency_est_ms += tele["latency_est_ms"]
        health = health_stats(self.samples)
        self.samples.clear()
        errors = sum(sum(c.errors.values()) for c in self.clients) + self.health_failed + tele["session_errors"]
        rejected = sum(sum(c.rejected.values()) for c in self.clients)
        iv = interval_record(a - t0, b - t0, per_session, tele, health, errors - self.errors_seen,
                             rejected - self.rejected_seen)
        iv["session_errors"] = tele["session_errors"]
        iv["soak_rss_mb"] = round(psutil.Process().memory_info().rss / 2**20, 1)  # this client's own: bounded
        self.errors_seen, self.rejected_seen = errors, rejected
        return iv

    def errors_detail(self, timeline) -> dict:
        out = collections.Counter()
        for c in self.clients:
            out.update(c.errors)
        out["session_errors"] = sum(iv["session_errors"] for iv in timeline)
        out["healthz_failed"] = self.health_failed
        return dict(out)

    def rejected_by_status(self) -> dict:
        out = collections.Counter()
        for c in self.clients:
            out.update({str(k): v for k, v in c.rejected.items()})
        return dict(out)


def _say(message: str) -> None:
    print(message, flush=True)


async def soak_async(server: str, minutes: float, sessions: int, thresholds: dict, speech: str | None = None,
                     telemetry: str | None = None, token: str | None = None, interval_s: float | None = None,
                     avatar: str = "0", seed: int = 0, say=_say) -> dict:
    """Run the soak (see the module docstring) and return its report (see summarize)."""
    if not minutes > 0:
        raise ClientError(f"--minutes must be > 0, got {minutes}")
    if sessions < 1:
        raise ClientError(f"--sessions must be >= 1, got {sessions}")
    if interval_s is not None and interval_s <= 0:
        raise ClientError(f"--interval must be > 0, got {interval_s}")
    base, loopback = _server_url(server)
    run_s = minutes * 60.0
    n_iv = max(1, int(round(run_s / (interval_s or auto_interval_s(run_s)))))
    interval_s = run_s / n_iv
    if speech:
        utterances = load_utterances(speech_files(speech))
    else:
        with tempfile.TemporaryDirectory(prefix="soak-speech-") as d:
            utterances = load_utterances(synthesize_speech(d))
    tap = TelemetryTap(telemetry) if telemetry else None
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HEALTH_POLL_S))
    stop = asyncio.Event()
    run = None
    try:
        before = await _health(http, base)
        if before is None:
            raise ClientError(f"the server at {base} does not answer GET /healthz")
        await asyncio.sleep(0.5)  # the telemetry subscription settles (ZMQ's slow joiner)
        if tap is not None and tap.error is not None:
            raise ClientError(f"cannot subscribe to the telemetry at {telemetry} ({tap.error})")
        t0 = time.monotonic()
        speak_until = t0 + run_s - MATCH_WINDOW_S - 0.5  # the last onsets are answered within the run
        clients = [SoakClient(f"s{i + 1}", base, loopback, utterances, seed + i, avatar, token, speak_until, say)
                   for i in range(sessions)]
        run = _Run(clients, tap, base, http, stop)
        tasks = [asyncio.ensure_future(c.run(stop, t0 + run_s)) for c in clients]
        tasks.append(asyncio.ensure_future(run.poll_health()))
        timeline = []
        for k in range(1, n_iv + 1):
            b = t0 + k * interval_s
            while True:  # digest every DIGEST_S until the interval's end
                now = time.monotonic()
                await asyncio.sleep(max(0.0, min(b, now + DIGEST_S) - now))
                await run.digest()
                if time.monotonic() >= b:
                    break
            timeline.append(await run.interval(b - interval_s, b, k == n_iv, t0))
            say(progress_line(timeline[-1], minutes, sessions))
            if k == 1 and tap is not None and tap.count == 0:
                say(f"no telemetry from {telemetry}: its figures stay empty (pass --telemetry ADDRESS)")
        stop.set()
        await asyncio.wait(tasks, timeout=HTTP_TIMEOUT_S)  # sessions closed and DELETEd
        await asyncio.sleep(SETTLE_S)
        after = await _health(http, base)
    finally:
        stop.set()
        await http.close()
        if tap is not None:
            tap.close()
        if run is not None:
            run.pool.shutdown(wait=True)
    report = summarize(timeline, thresholds, run.latency_est_ms, run.errors_detail(timeline), run.rejected_by_status(),
                       before=(before or {}).get("process"), after=(after or {}).get("process"))
    return {"server": base, "minutes": minutes, "sessions": sessions, "telemetry": telemetry or None,
            "telemetry_messages": tap.count if tap else 0,
            "session_ids": {c.label: c.sessions for c in clients}} | report


def run_soak(server: str, minutes: float, sessions: int = 1, thresholds=None, json_path: str | None = None,
             plot: str | None = None, **kw) -> dict:
    """Synchronous soak_async; writes the report JSON and the plot when asked. `thresholds`: the config's
    SoakConfig (or a dict of its fields); default: configs/default.toml's."""
    if thresholds is None:
        from engine.config import load_config
        thresholds = load_config().soak
    thresholds = asdict(thresholds) if is_dataclass(thresholds) else dict(thresholds)
    for path in (json_path, plot):
        if path and not Path(path).resolve().parent.is_dir():
            raise ClientError(f"no such directory for {path}")
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the analysis (lip-sync expert) leaves the cores to the server
    try:
        report = asyncio.run(soak_async(server, minutes, sessions, thresholds, **kw))
    finally:
        torch.set_num_threads(threads)
    if json_path:
        write_json(json_path, report, "the report")
    if plot:
        plot_report(report, plot)
    return report


def summary_line(report: dict) -> str:
    """The run in one line."""
    keys = ("latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "latency_ms_p95_first5", "latency_ms_p95_last5",
            "latency_est_ms_p50", "av_drift_ms", "rss_growth_pct", "threads_growth", "open_files_growth", "fps_min",
            "late_frames", "dropped_late", "chunks_skipped", "errors", "rejected")
    return " ".join(f"{k}={report.get(k)}" for k in keys)


def add_arguments(parser) -> None:
    """The soak's flags."""
    parser.add_argument("--server", default="http://127.0.0.1:8080", help="avatar server URL")
    parser.add_argument("--minutes", type=float, required=True, help="how long the sessions run")
    parser.add_argument("--sessions", type=int, default=1, help="concurrent client sessions")
    parser.add_argument("--speech", default=None,
                        help="a speech file or a directory of .wav files (default: held-out espeak-ng voices)")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--plot", default=None, help="PNG of latency, fps, RSS/threads and A/V offset over time")
    parser.add_argument("--telemetry", default=None, help="the server's ZMQ telemetry ('' = none; "
                        "default: [server] telemetry of --config)")
    parser.add_argument("--token", default=None, help="bearer token (default: SYNCAVATAR_TOKEN, then [server] token)")
    parser.add_argument("--config", default=None, help="TOML config: [soak] thresholds, [server] telemetry")
    parser.add_argument("--interval", type=float, default=None,
                        help="seconds per reported interval (default: a run's eighth, 10..60 s)")
    parser.add_argument("--avatar", default="0", help="identity number")
    parser.add_argument("--seed", type=int, default=0, help="speech and pause schedule (session i uses seed + i)")


def token_from(arg: str | None, config_token: str) -> str | None:
    """--token, else SYNCAVATAR_TOKEN, else the config's (as the server resolves its own)."""
    return arg if arg is not None else (os.environ.get("SYNCAVATAR_TOKEN") or config_token or None)
