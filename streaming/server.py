"""`syncavatar serve`: aiohttp + aiortc around the embedding API (streaming.session.Session).

    GET  /                 the browser client (clients/web), its files under /static/
    POST /offer            {sdp, type, avatar} -> {sdp, type, session}: one sendrecv connection
                           (or WHIP-style: Content-Type application/sdp, ?avatar=N -> 201, the answer SDP,
                           Location /sessions/{id})
    DELETE /sessions/{id}  end a session (idempotent)
    GET  /healthz          {status, sessions, pending_chunks, gen_ms, batch_ms, dit_ms, sessions_supported,
                          precision, audio_backend, ...}
    GET  /ice-servers      {iceServers}: the config's STUN/TURN servers, for the page

Per connection: the mic track's frames go to session.push_audio; one pump task reads session.frames()
(paced by the session clock) and hands every frame to both outgoing tracks, whose timestamps come from
the frame number, so audio and video cannot drift. A data channel labelled "telemetry" (opened by the
client) receives the session's chunk / second / decision messages as JSON text.

Requests come from the network, so every malformed one gets a 4xx with a short JSON error (never a
traceback, never more than a short prefix of the input echoed): POST /offer takes only application/json
or application/sdp in UTF-8, a body of at most MAX_BODY bytes that arrives within request_timeout_s, an
offer with exactly one audio and at most one video m-line. Browsers' cross-site requests are refused
unless their Origin is the server's own or in `allowed_origins`; on a loopback bind the Host must be a
loopback name (DNS rebinding). With a token set, /offer and /sessions need `Authorization: Bearer TOKEN`.
A session whose peer vanishes (no mic packet for PEER_SILENT_S, or ICE failed) is closed.
"""
from __future__ import annotations

import asyncio
import collections
import gc
import hmac
import ipaddress
import json
import logging
import os
import time
from fractions import Fraction
from pathlib import Path
from urllib.parse import urlsplit

import av
import numpy as np
from aiohttp import web
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from engine.audio import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from engine.data.portraits import canonical_avatar
from streaming.procstats import ProcessStats
from streaming.session import Session
from streaming.telemetry import Telemetry
from streaming.worker import HEADROOM, GenerationWorker
from engine.config import Config

log = logging.getLogger("syncavatar.serve")
WEB_DIR = Path(__file__).resolve().parents[1] / "clients" / "web"
VIDEO_CLOCK = 90000
OUT_QUEUE = 8  # frames buffered per outgoing track (~0.3 s); older ones are dropped if a track stalls
MAX_BODY = 64 * 1024  # an SDP offer is ~2-8 KB
MAX_ERROR_ECHO = 120  # characters of client input an error message may quote
PEER_SILENT_S = 3.0  # a connected peer that sends no mic packet for this long has gone: its session ends
RETRY_AFTER_S = 5  # Retry-After of a 503 (full) or 429 (per-client limit)
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


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
        half = SAMPLES_PER_FRAME // 2
        for k in range(2):
            super().put((f.index, k, pcm[k * half:(k + 1) * half]))

    async def recv(self):
        index, k, pcm = await self._get()
        frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts, frame.time_base = index * SAMPLES_PER_FRAME + k * len(pcm), Fraction(1, SAMPLE_RATE)
        if k == 0:
            self.session.mark_sent("audio", index)
        return frame


class Connection:
    """One browser / client: a peer connection, its Session and the tasks that move media."""

    def __init__(self, server: "AvatarServer", session: Session, pc: RTCPeerConnection, client: str):
        self.server, self.session, self.pc, self.client = server, session, pc, client
        self.last_packet = None  # monotonic time of the last mic packet
        self.video, self.audio = AvatarVideoTrack(session), SpeechAudioTrack(session)
        self.tasks: list[asyncio.Task] = []
        self.channel = None
        self.closed = False
        self.reason = None  # why it ended

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
                self.last_packet = time.monotonic()
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

    async def close(self, reason: str = "closed"):
        if self.closed:
            return
        self.closed, self.reason = True, reason
        log.info("session %s: ended (%s)", self.session.id, reason)
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
        # aiortc's codecs sit in reference cycles: without a collection their FFmpeg threads and buffers
        # stay until the next automatic GC (50 sessions: 16 -> 44 threads, +22 MB)
        gc.collect()


class AvatarServer:
    """The HTTP endpoints; owns the engine, the telemetry publisher and the connections."""

    def __init__(self, config: Config, engine: GenerationWorker, telemetry: Telemetry):
        self.config, self.engine, self.telemetry = config, engine, telemetry
        self.connections: dict[str, Connection] = {}
        self.ended: collections.deque = collections.deque(maxlen=256)  # recently ended ids: DELETE is idempotent
        self.procstats: ProcessStats | None = None
        s = config.server
        self.ice = RTCConfiguration([ice_server(u) for u in s.ice_servers]) if s.ice_servers else None
        self.token = os.environ.get("SYNCAVATAR_TOKEN") or s.token
        self.origins = {o.rstrip("/").lower() for o in s.allowed_origins}
        self.loopback_bind = _is_loopback(s.host)

    def slack_ms(self) -> float:
        """ms a chunk may take from its audio (with the look-ahead it waits for) having arrived to being
        ready: the playout delay less the chunk, that look-ahead and the policy's safety margin."""
        live, cfg = self.config.live, self.engine.cfg
        return live.playout_delay_ms - (cfg.frames + min(live.lookahead_wait, cfg.lookahead)) * 1000 / FPS \
            - live.safety_ms

    def at_capacity(self) -> str | None:
        """Why one more session would not get its chunks on time, or None. The worker's measured batch
        times (GenerationWorker.sessions_supported) decide: a round of one chunk per speaking session must
        fit one chunk period and the slack the playout delay leaves after a chunk's audio has arrived.
        One session is always admitted (on a CPU slower than real time it degrades, as before)."""
        if not self.config.server.admit_by_capacity or not self.connections:
            return None
        live, n = self.config.live, len(self.connections)
        frames = self.engine.cfg.frames
        slack_ms = self.slack_ms()
        fits, level, ms = self.engine.sessions_supported(slack_ms)
        if n + 1 <= fits:
            return None
        more = self.engine.batch_estimate_ms(len(self.engine.batch_ms) - 1, n + 1)
        may = min(HEADROOM * frames * 1000 / FPS, slack_ms - live.batch_wait_ms)
        return f"at capacity: {fits} speaking session(s) fit; {n + 1} chunks take {more:.0f} ms, a chunk may take {may:.0f} ms"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self.guard])
        app.router.add_get("/", self.index)
        app.router.add_post("/offer", self.offer)
        app.router.add_delete("/sessions/{id}", self.delete)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/ice-servers", self.ice_servers)
        if WEB_DIR.is_dir():
            app.router.add_static("/static/", WEB_DIR)
        app.on_shutdown.append(self.shutdown)
        return app

    @web.middleware
    async def guard(self, request, handler):
        """Host check (loopback binds), then the handler; aiohttp's own HTTP errors become short JSON."""
        if self.loopback_bind and _hostname(request.host) not in LOOPBACK_NAMES:
            return _error(421, "this server answers only to a loopback Host (127.0.0.1, localhost)")
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400 or e.content_type == "application/json":
                raise
            return _error(e.status, e.reason)

    def _refuse(self, request) -> web.Response | None:
        """Origin and token checks of the endpoints that start or end sessions."""
        origin = request.headers.get("Origin")
        if origin is not None:  # a browser; scripts and the Python client send none
            own = f"{request.scheme}://{request.host}".lower()
            if origin.rstrip("/").lower() not in self.origins | {own}:
                return _error(403, "cross-origin request refused (add the page's origin to [server] allowed_origins)")
        if self.token:
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {self.token}".encode()):
                return _error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        return None

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
                                  "batch_ms": [[round(ms, 1) for ms in b] for b in self.engine.batch_ms],
                                  "dit_ms": [[round(ms, 1) for ms in d] for d in self.engine.dit_ms],
                                  "sessions_supported": self.engine.sessions_supported(self.slack_ms())[0],
                                  "precision": self.engine.precision, "audio_backend": self.engine.audio_backend,
                                  "process": self.procstats.read(), "tasks": len(asyncio.all_tasks()),
                                  "idle_loops": self.engine.idle_loops_cached()})

    async def _read_offer(self, request) -> tuple[str, str | int | None, bool]:
        """(sdp, avatar or None, whip) from a JSON or application/sdp body; _BadRequest if unusable."""
        mime = request.content_type
        if mime not in ("application/json", "application/sdp"):
            raise _BadRequest(415, "Content-Type must be application/json (or application/sdp, as WHIP)")
        if (request.charset or "utf-8").lower() not in ("utf-8", "utf8"):
            raise _BadRequest(415, "charset must be utf-8")
        timeout = self.config.server.request_timeout_s
        try:
            body = await asyncio.wait_for(request.read(), timeout)
        except asyncio.TimeoutError:
            raise _BadRequest(408, f"request body not received within {timeout:g} s") from None
        except web.HTTPRequestEntityTooLarge:
            raise _BadRequest(413, f"request body over {MAX_BODY} bytes") from None
        except Exception:  # the client went away or broke the framing mid-body
            raise _BadRequest(400, "request body incomplete") from None
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise _BadRequest(400, "body is not UTF-8")
        if mime == "application/sdp":
            return text, request.query.get("avatar"), True
        try:
            params = json.loads(text)
        except (ValueError, RecursionError):
            raise _BadRequest(400, "body must be JSON: {sdp, type, avatar}")
        if not isinstance(params, dict) or not isinstance(params.get("sdp"), str) or params.get("type") != "offer":
            raise _BadRequest(400, "expected JSON {sdp: string, type: \"offer\", avatar}")
        avatar = params.get("avatar")
        if isinstance(avatar, bool) or (avatar is not None and not isinstance(avatar, (str, int))):
            raise _BadRequest(400, "avatar must be a string or a number")
        return params["sdp"], avatar, False

    async def offer(self, request):
        refused = self._refuse(request)
        if refused is not None:
            return refused
        try:
            sdp, avatar, whip = await self._read_offer(request)
            avatar = canonical_avatar(self.config.engine.avatar if avatar is None else avatar)
        except _BadRequest as e:
            return _error(e.status, e.message)
        except ValueError as e:  # the avatar id
            return _error(400, str(e))
        problem = _check_offer_sdp(sdp)
        if problem:
            return _error(400, f"bad offer: {problem}")
        try:
            answer, sid = await self.open_session(sdp, avatar, request.remote or "?")
        except _BadRequest as e:
            return _error(e.status, e.message, e.headers)
        if whip:
            return web.Response(status=201, body=answer.sdp, content_type="application/sdp",
                                headers={"Location": f"/sessions/{sid}"})
        return web.json_response({"sdp": answer.sdp, "type": answer.type, "session": sid})

    async def open_session(self, sdp: str, avatar: str, client: str,
                           session_id: str | None = None) -> tuple[RTCSessionDescription, str]:
        """Admit and host one session for a checked offer -> (answer, session id): the peer connection,
        the Session and its tracks, here. _BadRequest (503 / 429 / 400) when it cannot be served. What the
        HTTP handler calls after parsing the request; a server without HTTP (a replica) can call it too."""
        s = self.config.server
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        if len(self.connections) >= s.max_sessions:
            raise _BadRequest(503, f"server full: {s.max_sessions} sessions already running", retry)
        full = self.at_capacity()
        if full:
            raise _BadRequest(503, full, retry)
        if sum(c.client == client for c in self.connections.values()) >= s.max_sessions_per_client:
            raise _BadRequest(429, f"this client already holds {s.max_sessions_per_client} session(s)", retry)
        try:
            session = Session(self.engine, avatar, session_id=session_id, telemetry=self.telemetry)
        except ValueError as e:
            raise _BadRequest(400, str(e)) from None
        pc = RTCPeerConnection(self.ice)
        conn = Connection(self, session, pc, client)
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
                await conn.close(f"connection {pc.connectionState}")

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            kinds = {t.kind for t in pc.getTransceivers()}
            if kinds != {"audio", "video"}:
                raise ValueError("the offer needs one audio (mic, sendrecv) and one video (recvonly) transceiver")
            pc.addTrack(conn.audio)
            pc.addTrack(conn.video)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:  # aiortc raises several types for a malformed or unusable SDP
            await conn.close("bad offer")
            raise _BadRequest(400, f"bad offer: {type(e).__name__}: {e}") from None
        conn.start()
        conn.tasks.append(asyncio.ensure_future(self._watch(conn)))
        return pc.localDescription, session.id

    async def _watch(self, conn: Connection):
        """End a session whose peer never connects (connect_timeout_s) or has gone silent (PEER_SILENT_S):
        a client that vanishes without DELETE must not hold a slot until ICE consent expires (~30 s)."""
        timeout = self.config.server.connect_timeout_s
        start = time.monotonic()
        while not conn.closed:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if conn.last_packet is None:
                if now - start > timeout:
                    return await conn.close(f"not connected after {timeout:g} s")
            elif now - conn.last_packet > PEER_SILENT_S:
                return await conn.close(f"peer silent for {PEER_SILENT_S:g} s")

    async def delete(self, request):
        refused = self._refuse(request)
        if refused is not None:
            return refused
        sid = request.match_info["id"]
        conn = self.connections.get(sid)
        if conn is None:
            if sid in self.ended:
                return web.json_response({"closed": sid, "already": True})
            return _error(404, "no such session")
        await conn.close("DELETE")
        return web.json_response({"closed": conn.session.id})

    async def shutdown(self, app):
        await asyncio.gather(*(c.close("server shutdown") for c in list(self.connections.values())))


def _check_offer_sdp(sdp: str) -> str | None:
    """Why an offer's SDP is unusable (None if fine): exactly one audio m-line, at most one video m-line."""
    kinds = [line[2:].split(" ", 1)[0] for line in sdp.splitlines() if line.startswith("m=")]
    if kinds.count("audio") != 1:
        return f"expected exactly one audio m-line (the microphone), got {kinds.count('audio')}"
    if kinds.count("video") > 1:
        return f"expected at most one video m-line, got {kinds.count('video')}"
    return None


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _hostname(host_header: str | None) -> str:
    """"127.0.0.1:8080" -> "127.0.0.1", "[::1]:8080" -> "::1" (lower case; "" if unparsable)."""
    try:
        return (urlsplit("//" + (host_header or "")).hostname or "").lower()
    except ValueError:
        return ""


def ice_server(entry) -> RTCIceServer:
    """A STUN/TURN server from the config: "stun:host:port", or {urls, username, credential} for TURN."""
    if isinstance(entry, str):
        return RTCIceServer(urls=entry)
    if isinstance(entry, dict) and set(entry) <= {"urls", "username", "credential"} and "urls" in entry:
        return RTCIceServer(**entry)
    raise ValueError(f"[server] ice_servers: expected a URL or {{urls, username, credential}}, got {entry!r}")


def _error(status, message, headers=None):
    """A short JSON error; client input quoted in `message` is cut to MAX_ERROR_ECHO characters."""
    message = str(message)
    if len(message) > MAX_ERROR_ECHO:
        message = message[:MAX_ERROR_ECHO] + "..."
    return web.json_response({"error": message}, status=status, headers=headers)


class _BadRequest(Exception):
    """A request the server will not serve: HTTP status, a short message for the JSON error, headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def use_host_candidates(addresses: list[str]) -> None:
    """Make aioice offer exactly these host addresses; [] = the discovered interfaces plus 127.0.0.1 (aioice
    skips loopback when it discovers, and a client on this machine, such as `syncavatar client`, needs it)."""
    import aioice.ice
    if addresses:
        aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: list(addresses)
        return
    discover = getattr(aioice.ice, "_syncavatar_discover", aioice.ice.get_host_addresses)
    aioice.ice._syncavatar_discover = discover

    def with_loopback(use_ipv4=True, use_ipv6=True):
        found = discover(use_ipv4=use_ipv4, use_ipv6=use_ipv6)
        return found + ["127.0.0.1"] if use_ipv4 and "127.0.0.1" not in found else found

    aioice.ice.get_host_addresses = with_loopback


def use_audio_jitter_frames(frames: int) -> None:
    """Make aiortc hold `frames` received audio packets (20 ms each) before decoding, instead of its fixed
    4 (80 ms). On loopback/LAN 1 is enough and takes 60 ms off the latency; raise it on jittery networks.
    The buffer's capacity shrinks with it (2 * frames, at least 4, a power of two; aiortc's is 16): aiortc
    waits on a lost packet until the buffer is full and then stays that full, so with 16 a single lost
    packet added ~300 ms to the mic path for the rest of the session (measured under 3% loss).
    aiortc builds each receiver's JitterBuffer from this module global, so the patch is process-wide."""
    import aiortc.rtcrtpreceiver as receiver
    original = getattr(receiver, "_syncavatar_jitter_buffer", receiver.JitterBuffer)
    audio_capacity = 1 << max(2, (2 * frames - 1).bit_length())

    def jitter_buffer(capacity, prefetch=0, is_video=False):
        if is_video:
            return original(capacity=capacity, prefetch=prefetch, is_video=True)
        return original(capacity=min(capacity, audio_capacity), prefetch=frames, is_video=False)

    receiver._syncavatar_jitter_buffer = original
    receiver.JitterBuffer = jitter_buffer


def serve(config: Config) -> None:
    """Start the engine (worker process, idle loop of the default avatar), then serve until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("aioice", "aiortc"):  # their INFO lines carry candidates and ICE details: keep them out
        logging.getLogger(noisy).setLevel(logging.WARNING)
    s = config.server
    if not _is_loopback(s.host):
        log.warning("listening on %s: anyone who can reach it can start sessions%s", s.host,
                    "" if (os.environ.get("SYNCAVATAR_TOKEN") or s.token) else " (no [server] token set)")
    if s.telemetry and not _is_loopback(_hostname(s.telemetry.split("://", 1)[-1])):
        log.warning("telemetry published on %s, beyond this machine", s.telemetry)
    use_host_candidates(s.host_candidates)
    use_audio_jitter_frames(s.audio_jitter_frames)
    telemetry = Telemetry(s.telemetry or None)
    log.info("loading the model and starting the generation worker ...")
    engine = GenerationWorker(config)
    engine.idle_loop(config.engine.avatar)
    log.info("idle loop of avatar %s ready; chunk generation %s ms per level (%s), in %s", config.engine.avatar,
             [round(ms, 1) for ms in engine.gen_ms], "; ".join(engine.level_names), engine.precision)
    log.info("audio path: %s%s", engine.audio_backend, " (auto; one chunk: " + ", ".join(
        f"{n} {ms:.1f} ms" for n, ms in engine.audio_backend_ms.items()) + ")" if engine.audio_backend_ms else "")
    log.info("batches of 1..%d chunks: DiT %s ms per level (decoding every frame %s, %s; first frames %s)",
             len(engine.dit_ms[0]), [[round(ms) for ms in d] for d in engine.dit_ms],
             [round(ms) for ms in engine.decode_ms], "beside the next batch's DiT" if engine.pipelined
             else "after the DiT", [round(ms) for ms in engine.first_ms])
    if any(x != 1.0 for x in engine.decode_scale):
        log.info("levels' decoders cost %s of the model's", [round(x, 2) for x in engine.decode_scale])
    server = AvatarServer(config, engine, telemetry)
    try:
        web.run_app(server.app(), host=s.host, port=s.port, print=lambda m: log.info(
            "serving on http://%s:%d (telemetry %s)", s.host, s.port, s.telemetry or "off"))
    finally:
        engine.close()
        telemetry.close()
