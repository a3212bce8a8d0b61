"""Many workers: avatar-worker replicas on Ray Serve behind the aiohttp front (`syncavatar serve --workers N`).

Each replica (`AvatarReplica`, a Serve deployment with `[cluster] num_cpus / num_gpus`) runs what the
single-process server runs: a generation worker and an AvatarServer that hosts sessions (peer connection,
Session, tracks). The front (`ClusterFront`) is the one door: the page, /offer, /sessions, /healthz.
aiortc answers an offer with every ICE candidate at once, so one call places a session: the front
forwards the checked offer to a replica and returns its answer; the media then flows between the client
and that replica directly.

Placement and affinity: the front names each new session and uses the name as Serve's multiplexed model
id. Serve routes an id a replica already holds to that replica, so every later call for a session
reaches the replica that hosts it, and a new one to a replica holding the fewest. Serve learns a new id a
moment after the offer, so the front places one session at a time, and a replica that already hosts its
share of the sessions (live sessions / workers, rounded up) answers BUSY: the front asks again under a
new name until the session lands where there is room.

Telemetry: replicas publish (PUB, connect) into the front's proxy at `[cluster] telemetry_in`, which
relays everything to `[server] telemetry`; every replica message carries `replica`.

Sessions as requests: for each session the front keeps one call open on its replica (`attend`), which
returns when the session ends. Serve therefore counts live sessions as ongoing requests: a draining
replica (scale-down, redeploy) waits up to `[cluster] drain_timeout_s` for its sessions instead of
cutting them, and autoscaling can target sessions per replica (`target_ongoing_requests`).

Faults: when a replica dies, the open `attend` calls of its sessions fail at once, and the front ends
those sessions: a telemetry `session` `end` event with the reason, and `GET /sessions/{id}` says `ended`
and why. A replica that does not answer an offer within `replica_timeout_s` gives 503, so the front never
hangs on a dead replica; Serve starts a new replica in its place and new sessions go to the healthy ones.

Ray is imported only here, and this module only for `--workers N`: `make serve` never needs Ray.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from dataclasses import dataclass

from aiohttp import web
from aiortc import RTCSessionDescription
from ray import serve

from engine.config import Config
from streaming.server import RETRY_AFTER_S, AvatarServer, _BadRequest, _error, _is_loopback
from streaming.telemetry import Telemetry

log = logging.getLogger("syncavatar.cluster")
NOT_HOSTED = "not hosted"  # a replica's answer for a session it does not host
BUSY = "busy"  # a replica's answer to an offer beyond its share of the sessions
ROUTING_GRACE_S = 5.0  # how long after an offer Serve may still route the new session id elsewhere


class AvatarReplica:
    """One avatar worker (Serve replica): a generation worker and the sessions it hosts."""

    def __init__(self, config: Config):
        from streaming.server import use_audio_jitter_frames, use_host_candidates
        from streaming.worker import GenerationWorker
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        for noisy in ("aioice", "aiortc"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.id = serve.get_replica_context().replica_id.unique_id
        use_host_candidates(config.server.host_candidates)
        use_audio_jitter_frames(config.server.audio_jitter_frames)
        self.telemetry = Telemetry(config.cluster.telemetry_in or None, connect=True, fields={"replica": self.id})
        self.engine = GenerationWorker(config)
        self.engine.idle_loop(config.engine.avatar)
        self.server = AvatarServer(config, self.engine, self.telemetry)

    @serve.multiplexed(max_num_models_per_replica=1024)
    async def hold(self, session_id: str) -> str:
        """Serve's multiplexed 'model' of this replica: a session it hosts (see the module docstring)."""
        return session_id

    async def offer(self, sdp: str, avatar: str, client: str, share: int) -> dict:
        """Host the session named by the request's multiplexed id -> the answer, or {status, error}; BUSY
        when this replica already hosts its `share` of the sessions (the front then asks again)."""
        sid = serve.get_multiplexed_model_id()
        if len(self.server.connections) >= share:
            return {"status": BUSY, "replica": self.id}
        try:
            answer, sid = await self.server.open_session(sdp, avatar, client, session_id=sid)
        except _BadRequest as e:
            return {"status": e.status, "error": e.message, "headers": e.headers, "replica": self.id}
        await self.hold(sid)
        return {"sdp": answer.sdp, "type": answer.type, "session": sid, "replica": self.id}

    async def attend(self) -> str:
        """Return when the request's session ends (-> the reason). The front keeps this call open for the
        session's life: Serve then counts every live session as an ongoing request, so a draining replica
        waits for its sessions (graceful_shutdown_timeout_s), autoscaling sees sessions per replica, and
        the call failing tells the front at once that the replica died."""
        conn = self.server.connections.get(serve.get_multiplexed_model_id())
        if conn is None:
            return NOT_HOSTED
        while not conn.closed:
            await asyncio.sleep(0.25)
        return conn.reason or "ended"

    async def close(self, reason: str) -> str:
        conn = self.server.connections.get(serve.get_multiplexed_model_id())
        if conn is None:
            return NOT_HOSTED
        await conn.close(reason)
        return "closed"

    async def health(self) -> dict:
        return {"replica": self.id, "sessions": len(self.server.connections), "pending_chunks": self.engine.pending,
                "batch_ms": self.engine.batch_ms}


@dataclass
class Placement:
    replica: str
    client: str
    started: float
    ended: str | None = None  # why it ended


class ClusterFront(AvatarServer):
    """The aiohttp front: the same page, checks and endpoints as the single-process server; sessions are
    hosted by replicas (see the module docstring)."""

    def __init__(self, config: Config, handle, telemetry: Telemetry):
        super().__init__(config, None, telemetry)
        self.handle = handle
        self.placed: dict[str, Placement] = {}
        self.ended_reasons: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._attending: dict[str, asyncio.Future] = {}
        self._placing = asyncio.Lock()

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_get("/sessions/{id}", self.session_status)
        return app

    def _live(self) -> dict[str, Placement]:
        return {sid: p for sid, p in self.placed.items() if p.ended is None}

    async def open_session(self, sdp, avatar, client, session_id=None):
        s, live = self.config.server, self._live()
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        if len(live) >= s.max_sessions:
            raise _BadRequest(503, f"server full: {s.max_sessions} sessions already running", retry)
        if sum(p.client == client for p in live.values()) >= s.max_sessions_per_client:
            raise _BadRequest(429, f"this client already holds {s.max_sessions_per_client} session(s)", retry)
        share = -(-(len(live) + 1) // max(1, self.config.cluster.workers))  # sessions per replica, balanced
        async with self._placing:  # one placement at a time, so Serve sees each before the next
            deadline = time.monotonic() + self.config.cluster.replica_timeout_s
            while True:
                sid = uuid.uuid4().hex[:12]
                call = self.handle.options(multiplexed_model_id=sid).offer.remote(sdp, avatar, client, share)
                try:
                    r = await asyncio.wait_for(call, max(1.0, deadline - time.monotonic()))
                except Exception as e:  # a dead or hung replica, Serve unavailable: never hang the front
                    log.warning("offer %s: no replica answered (%s)", sid, type(e).__name__)
                    raise _BadRequest(503, "no avatar worker answered; retry", retry) from None
                if r.get("status") != BUSY:
                    break
                if time.monotonic() > deadline:
                    raise _BadRequest(503, "no avatar worker has room; retry", retry)
                await asyncio.sleep(0.25)  # Serve learns where the last session went, then routes elsewhere
        if "error" in r:
            raise _BadRequest(r["status"], r["error"], r.get("headers"))
        self.placed[sid] = Placement(r["replica"], client, time.monotonic())
        self._attending[sid] = asyncio.ensure_future(self._attend(sid, r["replica"]))
        log.info("session %s placed on replica %s", sid, r["replica"])
        return RTCSessionDescription(sdp=r["sdp"], type=r["type"]), sid

    def _end(self, sid: str, reason: str) -> None:
        p = self.placed.get(sid)
        if p is None or p.ended is not None:
            return
        p.ended = reason
        self.ended_reasons[sid] = reason
        while len(self.ended_reasons) > 256:
            self.ended_reasons.popitem(last=False)
        self.placed.pop(sid, None)
        self._attending.pop(sid, None)
        log.info("session %s ended (%s)", sid, reason)
        self.telemetry.publish(sid, "session", (time.monotonic() - p.started) * 1000, event="end", reason=reason,
                               replica=p.replica)

    async def _call(self, sid: str, method: str, *args):
        """Call `method` on the replica hosting `sid`. Serve learns which replica holds a new session id a
        moment after the offer, so an answer of "not hosted" is retried for ROUTING_GRACE_S."""
        start = time.monotonic()
        while True:
            result = await getattr(self.handle.options(multiplexed_model_id=sid), method).remote(*args)
            if result != NOT_HOSTED or time.monotonic() - start > ROUTING_GRACE_S:
                return result
            await asyncio.sleep(0.25)

    async def _attend(self, sid: str, replica: str):
        """Hold the session's attend() call open; it ends with the session, or fails with its replica."""
        try:
            reason = await self._call(sid, "attend")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # RayActorError and kin: the replica is gone, and the session with it
            reason = f"replica {replica} died ({type(e).__name__})"
        self._end(sid, "lost by its replica" if reason == NOT_HOSTED else reason)

    async def session_status(self, request):
        sid = request.match_info["id"]
        p = self.placed.get(sid)
        if p is not None:
            return web.json_response({"session": sid, "state": "live", "replica": p.replica})
        if sid in self.ended_reasons:
            return web.json_response({"session": sid, "state": "ended", "reason": self.ended_reasons[sid]})
        return _error(404, "no such session")

    async def delete(self, request):
        refused = self._refuse(request)
        if refused is not None:
            return refused
        sid = request.match_info["id"]
        if sid not in self.placed:
            if sid in self.ended_reasons:
                return web.json_response({"closed": sid, "already": True})
            return _error(404, "no such session")
        try:
            await asyncio.wait_for(self._call(sid, "close", "DELETE"), 10.0)
        except Exception:
            pass  # the replica is gone: the session is too
        self._end(sid, "DELETE")
        return web.json_response({"closed": sid})

    async def healthz(self, request):
        live = self._live()
        by_replica = collections.Counter(p.replica for p in live.values())
        return web.json_response({"status": "ok", "sessions": len(live), "replicas": dict(by_replica),
                                  "workers": self.config.cluster.workers, "tasks": len(asyncio.all_tasks())})

    async def shutdown(self, app):
        for task in list(self._attending.values()):
            task.cancel()
        for sid in list(self._live()):
            try:
                await asyncio.wait_for(self.handle.options(multiplexed_model_id=sid).close.remote("server shutdown"), 5)
            except Exception:
                pass


def _relay(inbound: str, outbound: str):
    """A ZMQ XSUB -> XPUB proxy in a thread: replicas' messages from `inbound` to subscribers at `outbound`."""
    import zmq
    from zmq.devices import ThreadProxy
    proxy = ThreadProxy(zmq.XSUB, zmq.XPUB)
    proxy.bind_in(inbound)
    proxy.bind_out(outbound)
    proxy.start()
    return proxy


def serve_cluster(config: Config) -> None:
    """Start Ray and `workers` avatar-worker replicas on Serve, then the front, until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import ray
    s, c = config.server, config.cluster
    if not _is_loopback(s.host):
        log.warning("listening on %s: anyone who can reach it can start sessions", s.host)
    if s.telemetry:
        _relay(c.telemetry_in, s.telemetry)
    telemetry = Telemetry(c.telemetry_in if s.telemetry else None, connect=True, fields={"replica": "front"})
    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    scaling = {"num_replicas": c.workers} if c.max_workers <= c.workers else {"autoscaling_config": {
        "min_replicas": c.workers, "max_replicas": c.max_workers, "target_ongoing_requests": c.sessions_per_worker}}
    deployment = serve.deployment(
        AvatarReplica, name="avatar-worker", max_ongoing_requests=64, **scaling,
        ray_actor_options={"num_cpus": c.num_cpus, "num_gpus": c.num_gpus},
        health_check_period_s=2, health_check_timeout_s=10, graceful_shutdown_timeout_s=c.drain_timeout_s)
    log.info("starting %d avatar-worker replicas on Ray Serve ...", c.workers)
    handle = serve.run(deployment.bind(config), name="syncavatar", route_prefix=None)
    front = ClusterFront(config, handle, telemetry)
    try:
        web.run_app(front.app(), host=s.host, port=s.port, print=lambda m: log.info(
            "front serving on http://%s:%d, %d replicas (telemetry %s)", s.host, s.port, c.workers,
            s.telemetry or "off"))
    finally:
        serve.shutdown()
        ray.shutdown()
        telemetry.close()
