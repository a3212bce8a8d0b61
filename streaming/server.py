"""`syncavatar serve`: aiohttp + aiortc around the embedding API (streaming.session.Session).

    GET  /                 the browser client (clients/web), its files under /static/
    POST /offer            {sdp, type, avatar} -> {sdp, type, session}: one sendrecv connection
    DELETE /sessions/{id}  end a session (idempotent)
    GET  /healthz          {status, sessions, pending_chunks, gen_ms}
    GET  /ice-servers      {iceServers}: the config's STUN/TURN servers, for the page

Per connection: the mic track's frames go to session.push_audio; one pump task reads session.frames()
(paced by the session clock) and hands every frame to both outgoing tracks, whose timestamps come from
the frame number, so audio and video cannot drift. A data channel labelled "telemetry" (opened by the
client) receives the session's chunk / second / decision messages as JSON text.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from aiohttp import web
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from streaming.engine import Engine
from streaming.procstats import ProcessStats
from streaming.session import FRAME_SAMPLES, Session
from streaming.telemetry import Telemetry
from syncavatar.config import Config

log = logging.getLogger("syncavatar.serve")
WEB_DIR = Path(__file__).resolve().parents[1] / "clients" / "web"
VIDEO_CLOCK = 90000
OUT_QUEUE = 8  # frames buffered per outgoing track (~0.3 s); older ones are dropped if a track stalls


class _PacedTrack(MediaStreamTrack):
    """An outgoing track fed by the session pump through a small bounded queue."""

    def __init__(self, session: Session):
        super().__init__()
        self.session = session
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=OUT_QUEUE)
        self.dropped = 0

    def put(self, item):
        if self.queue.full():  # the sender is not pulling (not connected yet, or stalled): keep it fresh
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(item)

    async def _get(self):
        item = await self.queue.get()
        if item is None:
            self.stop()
            raise MediaStreamError
        return item


class AvatarVideoTrack(_PacedTrack):
    kind = "video"

    async def recv(self):
        f = await self._get()
        frame = av.VideoFrame.from_ndarray(f.rgb, format="rgb24")
        frame.pts, frame.time_base = f.index * VIDEO_CLOCK // 25, Fraction(1, VIDEO_CLOCK)
        self.session.mark_sent("video", f.index)
        return frame


class SpeechAudioTrack(_PacedTrack):
    """The mic audio, delayed to its frames: each 40 ms frame's 640 samples leave as two 20 ms packets."""
    kind = "audio"

    def put(self, f):
        if f is None:
            return super().put(None)
        pcm = np.clip(f.audio * 32767, -32768, 32767).astype(np.int16)
        half = FRAME_SAMPLES // 2
        for k in range(2):
            super().put((f.index, k, pcm[k * half:(k + 1) * half]))

    async def recv(self):
        index, k, pcm = await self._get()
        frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        frame.sample_rate = 16000
        frame.pts, frame.time_base = index * FRAME_SAMPLES + k * len(pcm), Fraction(1, 16000)
        if k == 0:
            self.session.mark_sent("audio", index)
        return frame


class Connection:
    """One browser / client: a peer connection, its Session and the tasks that move media."""

    def __init__(self, server: "AvatarServer", session: Session, pc: RTCPeerConnection):
        self.server, self.session, self.pc = server, session, pc
        self.video, self.audio = AvatarVideoTrack(session), SpeechAudioTrack(session)
        self.tasks: list[asyncio.Task] = []
        self.channel = None
        self.closed = False

    def start(self):
        self.tasks.append(asyncio.ensure_future(self._pump()))

    async def _pump(self):
        try:
            async for f in self.session.frames():
                self.video.put(f)
                self.audio.put(f)
        except Exception:
            log.exception("session %s: frame pump failed", self.session.id)
            await self.close()

    async def consume_mic(self, track):
        """Mic frames (aiortc gives 48 kHz stereo s16, 20 ms) -> session.push_audio."""
        try:
            while True:
                frame = await track.recv()
                pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))
                self.session.push_audio(pcm, frame.sample_rate)
        except MediaStreamError:
            pass
        except Exception:
            log.exception("session %s: mic track failed", self.session.id)

    def on_telemetry(self, session_id, msg):
        ch = self.channel
        if session_id == self.session.id and ch is not None and ch.readyState == "open" and msg["type"] != "session":
            ch.send(json.dumps(msg))

    async def close(self):
        if self.closed:
            return
        self.closed = True
        self.session.close()
        self.server.telemetry.listeners = [f for f in self.server.telemetry.listeners if f != self.on_telemetry]
        self.video.put(None)
        self.audio.put(None)
        for t in self.tasks:
            if t is not asyncio.current_task():  # close() may run inside one of them
                t.cancel()
        await self.pc.close()
        self.server.connections.pop(self.session.id, None)
        self.server.ended.append(self.session.id)


class AvatarServer:
    """The HTTP endpoints; owns the engine, the telemetry publisher and the connections."""

    def __init__(self, config: Config, engine: Engine, telemetry: Telemetry):
        self.config, self.engine, self.telemetry = config, engine, telemetry
        self.connections: dict[str, Connection] = {}
        self.ended: collections.deque = collections.deque(maxlen=256)  # recently ended ids: DELETE is idempotent
        self.procstats: ProcessStats | None = None
        s = config.server
        self.ice = RTCConfiguration([ice_server(u) for u in s.ice_servers]) if s.ice_servers else None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.index)
        app.router.add_post("/offer", self.offer)
        app.router.add_delete("/sessions/{id}", self.delete)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/ice-servers", self.ice_servers)
        if WEB_DIR.is_dir():
            app.router.add_static("/static/", WEB_DIR)
        app.on_shutdown.append(self.shutdown)
        return app

    async def index(self, request):
        page = WEB_DIR / "index.html"
        if not page.exists():
            raise web.HTTPNotFound(text="clients/web/index.html is missing")
        return web.FileResponse(page)

    async def ice_servers(self, request):
        """The STUN/TURN servers of the config, for the page's RTCPeerConnection."""
        servers = [{"urls": e} if isinstance(e, str) else e for e in self.config.server.ice_servers]
        return web.json_response({"iceServers": servers})

    async def healthz(self, request):
        """Status, plus the server's and worker's resources (CPU since the previous /healthz) for soak tests."""
        if self.procstats is None:
            self.procstats = ProcessStats(self.engine.worker_pids())
        return web.json_response({"status": "ok", "sessions": len(self.connections),
                                  "pending_chunks": self.engine.pending,
                                  "gen_ms": [None if g is None else round(g, 1) for g in self.engine.gen_ms],
                                  "process": self.procstats.read()})

    async def offer(self, request):
        try:
            params = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "body must be JSON: {sdp, type, avatar}")
        if not isinstance(params, dict) or not isinstance(params.get("sdp"), str) or params.get("type") != "offer":
            return _error(400, "expected JSON {sdp: string, type: \"offer\", avatar}")
        if len(self.connections) >= self.config.server.max_sessions:
            return _error(503, f"server full: {self.config.server.max_sessions} sessions already running")
        avatar = str(params.get("avatar", self.config.engine.avatar))
        try:
            session = Session(self.engine, avatar, telemetry=self.telemetry)
        except ValueError as e:
            return _error(400, str(e))
        pc = RTCPeerConnection(self.ice)
        conn = Connection(self, session, pc)
        self.connections[session.id] = conn
        self.telemetry.listeners.append(conn.on_telemetry)

        @pc.on("datachannel")
        def on_datachannel(channel):
            if channel.label == "telemetry":
                conn.channel = channel

        @pc.on("track")
        def on_track(track):
            if track.kind == "audio":
                conn.tasks.append(asyncio.ensure_future(conn.consume_mic(track)))

        @pc.on("connectionstatechange")
        async def on_state():
            log.info("session %s: connection %s", session.id, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await conn.close()

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=params["sdp"], type="offer"))
            kinds = {t.kind for t in pc.getTransceivers()}
            if kinds != {"audio", "video"}:
                raise ValueError("the offer needs one audio (mic, sendrecv) and one video (recvonly) transceiver")
            pc.addTrack(conn.audio)
            pc.addTrack(conn.video)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:  # aiortc raises several types for a malformed or unusable SDP
            await conn.close()
            return _error(400, f"bad offer: {type(e).__name__}: {e}")
        conn.start()
        conn.tasks.append(asyncio.ensure_future(self._expire_unconnected(conn)))
        return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type,
                                  "session": session.id})

    async def _expire_unconnected(self, conn: Connection):
        """A session whose peer never connects must not hold a slot (max_sessions) forever."""
        timeout = self.config.server.connect_timeout_s
        await asyncio.sleep(timeout)
        if conn.pc.connectionState != "connected" and not conn.closed:
            log.info("session %s: not connected after %g s, closing", conn.session.id, timeout)
            await conn.close()

    async def delete(self, request):
        sid = request.match_info["id"]
        conn = self.connections.get(sid)
        if conn is None:
            if sid in self.ended:
                return web.json_response({"closed": sid, "already": True})
            return _error(404, f"no session {sid}")
        await conn.close()
        return web.json_response({"closed": conn.session.id})

    async def shutdown(self, app):
        await asyncio.gather(*(c.close() for c in list(self.connections.values())))


def ice_server(entry) -> RTCIceServer:
    """A STUN/TURN server from the config: "stun:host:port", or {urls, username, credential} for TURN."""
    if isinstance(entry, str):
        return RTCIceServer(urls=entry)
    if isinstance(entry, dict) and set(entry) <= {"urls", "username", "credential"} and "urls" in entry:
        return RTCIceServer(**entry)
    raise ValueError(f"[server] ice_servers: expected a URL or {{urls, username, credential}}, got {entry!r}")


def _error(status, message):
    return web.json_response({"error": message}, status=status)


def use_host_candidates(addresses: list[str]) -> None:
    """Make aioice offer exactly these host addresses (it skips 127.0.0.1 when discovering on its own)."""
    if addresses:
        import aioice.ice
        aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: list(addresses)


def use_audio_jitter_frames(frames: int) -> None:
    """Make aiortc hold `frames` received audio packets (20 ms each) before decoding, instead of its fixed
    4 (80 ms). On loopback/LAN 1 is enough and takes 60 ms off the latency; raise it on jittery networks.
    aiortc builds each receiver's JitterBuffer from this module global, so the patch is process-wide."""
    import aiortc.rtcrtpreceiver as receiver
    original = getattr(receiver, "_syncavatar_jitter_buffer", receiver.JitterBuffer)

    def jitter_buffer(capacity, prefetch=0, is_video=False):
        return original(capacity=capacity, prefetch=prefetch if is_video else frames, is_video=is_video)

    receiver._syncavatar_jitter_buffer = original
    receiver.JitterBuffer = jitter_buffer


def serve(config: Config) -> None:
    """Start the engine (worker process, idle loop of the default avatar), then serve until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    s = config.server
    use_host_candidates(s.host_candidates)
    use_audio_jitter_frames(s.audio_jitter_frames)
    telemetry = Telemetry(s.telemetry or None)
    log.info("loading the model and starting the generation worker ...")
    engine = Engine(config)
    engine.idle_loop(config.engine.avatar)
    log.info("idle loop of avatar %s ready; chunk generation %s ms per cache level, in %s", config.engine.avatar,
             [round(ms, 1) for ms in engine.gen_ms], engine.precision)
    server = AvatarServer(config, engine, telemetry)
    try:
        web.run_app(server.app(), host=s.host, port=s.port, print=lambda m: log.info(
            "serving on http://%s:%d (telemetry %s)", s.host, s.port, s.telemetry or "off"))
    finally:
        engine.close()
        telemetry.close()
