"""Latency telemetry over ZeroMQ PUB: one multipart message [topic = session id, JSON] per event.

Schema (version SCHEMA_VERSION, documented in the README): every message has `schema`, `type`,
`session` and `t_ms` (session clock); types are "session" (start / end), "chunk" (one per chunk, sent
once its last frame went out), "second" (once a second) and "decision" (the backpressure policy).
Publishing never blocks: past the high-water mark ZMQ drops, and a subscriber that joins late misses
what came before (ZMQ's slow joiner), so consumers must not assume they see a session's first message.
"""
from __future__ import annotations

import json
import threading

SCHEMA_VERSION = 1


class Telemetry:
    """Thread-safe, non-blocking publisher; address "" or None publishes nowhere (listeners still get it).

    connect: connect the PUB socket to `address` instead of binding it (a replica publishing into the
    cluster front's proxy); fields: added to every message (e.g. {"replica": id})."""

    def __init__(self, address: str | None = None, hwm: int = 10000, connect: bool = False,
                 fields: dict | None = None):
        self.address = address or None
        self.fields = dict(fields or {})
        self._lock = threading.Lock()
        self._sock = None
        self.listeners = []  # callables(session_id, message dict), e.g. a WebRTC data channel
        self.sent = 0
        self.dropped = 0
        if self.address:
            import zmq
            self._ctx = zmq.Context.instance()
            self._sock = self._ctx.socket(zmq.PUB)
            self._sock.setsockopt(zmq.SNDHWM, hwm)
            self._sock.setsockopt(zmq.LINGER, 0)
            (self._sock.connect if connect else self._sock.bind)(self.address)

    def publish(self, session: str, type_: str, t_ms: float, **fields) -> dict:
        msg = {"schema": SCHEMA_VERSION, "type": type_, "session": session, "t_ms": round(t_ms, 1)} \
            | self.fields | fields
        for fn in list(self.listeners):
            fn(session, msg)
        if self._sock is not None:
            import zmq
            data = json.dumps(msg).encode()
            with self._lock:
                try:
                    self._sock.send_multipart([session.encode(), data], flags=zmq.NOBLOCK)
                    self.sent += 1
                except zmq.Again:
                    self.dropped += 1
        return msg

    def close(self):
        with self._lock:
            if self._sock is not None:
                self._sock.close(0)
                self._sock = None


def messages(address: str, session: str = "", poll_s: float = 0.2):
    """Yield message dicts from a Telemetry publisher, or None after each poll_s without one.

    Topic filter = session id prefix ("" = all sessions). One SUB socket for the generator's life.
    """
    import zmq
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, session.encode())
    sock.connect(address)
    try:
        while True:
            if not sock.poll(int(poll_s * 1000)):
                yield None
                continue
            _topic, data = sock.recv_multipart()
            yield json.loads(data)
    finally:
        sock.close(0)


# columns of the live table (`syncavatar telemetry`): message type -> fields
TABLE = {
    "chunk": ["chunk", "kind", "level", "gen_ms", "computed_steps", "reused_steps", "jobs_queued",
              "ready_frames", "latency_est_ms", "av_offset_ms"],
    "second": ["fps_in", "fps_out", "drops", "late_frames", "loop_lag_max_ms", "cpu_percent", "rss_mb", "threads",
               "open_files"],
    "decision": ["action", "level", "reason"],
    "session": ["event", "avatar"],
}
# the schema's fields that the live table leaves out (the CSV has them all)
CSV_MORE = ["batch", "replica", "deadline_ms", "send_ms", "ready_frames", "dropped_late", "gap_fill_ms", "level", "jobs_in_flight",
            "level_name", "playout_delay_ms", "cache", "frames_out", "speech_frames", "idle_frames", "samples_in",
            "pushes", "errors", "decode_ms", "first_ready_ms"]


def format_row(msg: dict) -> str:
    """One line of the live table for a message."""
    cols = TABLE.get(msg.get("type"), [])
    vals = " ".join(f"{c}={msg.get(c)}" for c in cols)
    return f"{msg.get('t_ms', 0) / 1000:9.2f}s {msg.get('session', '')[:8]:8} {msg.get('type', ''):8} {vals}"


def watch(address: str, session: str = "", csv_path: str | None = None, types=("chunk", "second", "decision",
          "session"), duration: float | None = None, idle_timeout: float | None = None, out=None) -> int:
    """`syncavatar telemetry`: print a live table (one line per message), optionally append CSV rows.

    CSV columns: every field of the schema (README's telemetry table) in a fixed order, one row per message.
    Returns the number of messages seen.
    """
    import csv
    import sys
    import time
    out = out or sys.stdout
    cols = ["schema", "session", "type", "t_ms", "capture_ms", "ready_ms", "gen_start_ms", "gen_end_ms", "send_ms"]
    for fields in list(TABLE.values()) + [CSV_MORE]:
        cols += [c for c in fields if c not in cols]
    writer, fh = None, None
    if csv_path:
        fh = open(csv_path, "a", newline="")
        writer = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        if fh.tell() == 0:
            writer.writeheader()
    print(f"listening on {address} (session {session or 'all'}); Ctrl-C to stop", file=out, flush=True)
    start = last = time.monotonic()
    n = 0
    try:
        for msg in messages(address, session):
            now = time.monotonic()
            if duration is not None and now - start >= duration:
                break
            if msg is None:
                if idle_timeout is not None and now - last >= idle_timeout:
                    break
                continue
            last = now
            n += 1
            if writer is not None:
                writer.writerow(msg)
                fh.flush()
            if msg.get("type") in types:
                print(format_row(msg), file=out, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        if fh is not None:
            fh.close()
    return n
