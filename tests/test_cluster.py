"""`syncavatar serve --workers 2`: avatar-worker replicas on Ray Serve behind the front (tests/cluster.toml).

Two sessions land on different replicas (their telemetry says which) and both stream at >= 20 fps; a third
gets 503 with Retry-After; killing the replica of one ends that session with a clear reason (GET
/sessions/{id}, telemetry) while the other keeps streaming. Ray is started once, for this module.
"""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import LiveServer, free_port, http_json

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic use


def _need_ray():
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"Ray Serve is required in CI (make test installs the [cluster] extra): {e}")
        pytest.skip(f"Ray Serve not installed: {e}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _need_ray()
    tmp = tmp_path_factory.mktemp("cluster")
    cfg = tmp / "cluster.toml"  # the replicas' telemetry relay on a free port
    cfg.write_text((ROOT / "tests" / "cluster.toml").read_text()
                   + f'telemetry_in = "tcp://127.0.0.1:{free_port()}"\n')
    srv = LiveServer(tmp / "serve.log", config=str(cfg)).wait_ready(timeout_s=300)
    yield srv
    srv.stop()
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)


def _speech(path, seconds):
    subprocess.run(["bash", str(ROOT / "docs" / "live" / "make_speech.sh"), str(path), str(seconds)], check=True)


def _collect(address, out, stop):
    import zmq
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    while not stop.is_set():
        if sock.poll(200):
            out.append(json.loads(sock.recv_multipart()[1]))
    sock.close()


def _client(url, audio, avatar, out_json, log):
    return subprocess.Popen([sys.executable, "-m", "syncavatar.cli", "client", "--server", url, "--audio", str(audio),
                             "--avatar", str(avatar), "--json", str(out_json)], cwd=ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def _kill_replica(replica_id):
    import ray
    ray.init(address="auto", namespace="serve", log_to_driver=False)
    try:
        names = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if "SERVE_REPLICA" in a["name"] and a["name"].endswith(replica_id)]
        assert names, f"no replica actor named ...{replica_id}"
        ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=False)
    finally:
        ray.shutdown()


def test_sessions_spread_over_replicas_and_a_dead_replica_ends_only_its_own(cluster, tmp_path):
    audio = tmp_path / "speech.wav"
    _speech(audio, 16)
    msgs, stop = [], threading.Event()
    sub = threading.Thread(target=_collect, args=(cluster.telemetry, msgs, stop), daemon=True)
    sub.start()
    time.sleep(1.0)
    a = _client(cluster.url, audio, 0, tmp_path / "a.json", tmp_path / "a.log")
    b = _client(cluster.url, audio, 5, tmp_path / "b.json", tmp_path / "b.log")
    try:
        deadline = time.monotonic() + 60
        starts = {}
        while len(starts) < 2 and time.monotonic() < deadline:
            starts = {m["session"]: m.get("replica") for m in list(msgs)
                      if m["type"] == "session" and m.get("event") == "start"}
            time.sleep(0.2)
        assert len(starts) == 2, f"sessions seen: {starts}\n{cluster.log()}"
        assert len(set(starts.values())) == 2 and None not in starts.values()  # different replicas
        third = subprocess.run([sys.executable, "-m", "syncavatar.cli", "client", "--server", cluster.url, "--audio",
                                str(audio), "--duration", "1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert third.returncode == 2 and "503" in third.stderr and "retry after" in third.stderr
        time.sleep(3.0)
        victim, survivor = sorted(starts)
        for sid in starts:  # both streamed at >= 20 fps before the kill (telemetry, seconds after the first)
            fps = [m["fps_out"] for m in list(msgs) if m["type"] == "second" and m["session"] == sid][1:]
            assert fps and min(fps) >= 20, (sid, fps)
        _kill_replica(starts[victim])
        ended = None
        for _ in range(40):  # the session's open attend() call fails with its replica
            status, body = http_json("GET", f"{cluster.url}/sessions/{victim}")
            if status == 200 and body["state"] == "ended":
                ended = body
                break
            time.sleep(0.5)
        assert ended is not None and "replica" in ended["reason"], ended
        status, body = http_json("GET", f"{cluster.url}/sessions/{survivor}")
        assert status == 200 and body["state"] == "live" and body["replica"] == starts[survivor]
        assert any(m["type"] == "session" and m.get("event") == "end" and m["session"] == victim
                   and "replica" in m.get("reason", "") for m in list(msgs))
        a.wait(timeout=120)
        b.wait(timeout=120)
    finally:
        stop.set()
        for p in (a, b):
            if p.poll() is None:
                p.kill()
    stats = {json.loads(p.read_text())["session"]: json.loads(p.read_text())
             for p in (tmp_path / "a.json", tmp_path / "b.json") if p.exists()}
    assert survivor in stats and stats[survivor]["fps"] >= 20, stats
    status, health = http_json("GET", f"{cluster.url}/healthz")
    assert status == 200 and health["workers"] == 2 and health["sessions"] == 0  # the clients hung up
    status, body = http_json("GET", f"{cluster.url}/sessions/{survivor}")  # whichever the front heard first
    assert status == 200 and body["state"] == "ended" and body["reason"] in ("DELETE", "connection closed")
