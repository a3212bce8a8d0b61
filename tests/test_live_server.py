"""The live server end to end with the Python client: WebRTC over loopback, telemetry over ZMQ, HTTP errors."""
import collections
import json
import threading
import time
import urllib.request

import pytest

from clients.client import run_client
from conftest import http_json as _http, require_real_time
from engine.lipsync import evaluate
from engine.media import read_mp4
from streaming.telemetry import messages


def test_http_endpoints_and_errors(live_server):
    status, health = _http("GET", live_server + "/healthz")
    assert status == 200 and health["status"] == "ok"
    # the default audio_backend = "auto" resolved at worker start-up to a CPU backend it timed
    assert health["audio_backend"] in ("torch", "onnxruntime") and health["precision"] in ("bf16", "fp32")
    with urllib.request.urlopen(live_server + "/", timeout=10) as r:
        assert b"<video" in r.read()  # the browser client
    assert _http("POST", live_server + "/offer", "not json")[0] == 400
    status, err = _http("POST", live_server + "/offer", json.dumps({"sdp": "v=0", "type": "answer"}))
    assert status == 400 and "offer" in err["error"]
    status, err = _http("POST", live_server + "/offer", json.dumps({"sdp": "v=0", "type": "offer", "avatar": "x"}))
    assert status == 400 and "avatar" in err["error"]
    assert _http("DELETE", live_server + "/sessions/nope")[0] == 404
    assert _http("GET", live_server + "/ice-servers") == (200, {"iceServers": []})  # none by default


def test_python_client_end_to_end_with_telemetry_for_every_chunk(live_server_proc, tmp_path):
    from conftest import _espeak_wav
    wav = _espeak_wav(tmp_path / "s.wav", "Our plan is simple. Speak slowly, then wait for the answer.",
                      voice="en-us+f3")
    got = []
    stop = threading.Event()

    def listen():  # subscribe before the session starts (ZMQ's slow joiner)
        for m in messages(live_server_proc.telemetry, poll_s=0.1):
            if m is not None:
                got.append(m)
            if stop.is_set():
                return

    th = threading.Thread(target=listen, daemon=True)
    th.start()
    time.sleep(0.5)
    rec, js = tmp_path / "rec.mp4", tmp_path / "stats.json"
    stats = run_client(live_server_proc.url, str(wav), record=str(rec), json_path=str(js))
    time.sleep(1.0)  # the last chunk records go out after their last frame
    stop.set()
    th.join(5)

    assert json.loads(js.read_text()) == stats
    for k in ("frames_received", "fps", "ttff_ms", "latency_ms_p50", "latency_ms_p95", "av_offset_ms"):
        assert k in stats, k
    assert stats["frames_received"] >= stats["audio_s"] * 25  # the whole utterance came back, as video
    assert stats["telemetry_messages"] > 0  # the data channel

    # the recording: video with the speech that came back
    frames, audio, fps = read_mp4(rec)
    assert len(frames) == stats["frames_received"] and audio is not None and fps == 25

    # ZMQ telemetry: one chunk message for every chunk of the session, in order, with the schema's fields
    sess = [m for m in got if m["session"] == stats["session"]]
    chunks = [m for m in sess if m["type"] == "chunk"]
    assert chunks, f"no chunk telemetry: {sess[:3]}"
    assert [m["chunk"] for m in chunks] == list(range(len(chunks)))
    assert len(chunks) >= stats["frames_received"] // 4 - 2
    assert all(m["schema"] == 1 for m in sess)
    speech = [m for m in chunks if m["kind"] == "speech"]
    assert speech, "no chunk was generated from speech"
    for k in ("capture_ms", "ready_ms", "gen_start_ms", "gen_end_ms", "send_ms", "computed_steps", "reused_steps",
              "jobs_queued", "ready_frames", "av_offset_ms", "latency_est_ms"):
        assert all(k in m for m in speech), k
    assert all(m["reused_steps"] > 0 for m in speech if "reused_steps" in m)  # SyncCache on by default
    seconds = [m for m in sess if m["type"] == "second"]
    assert seconds and all(m["rss_mb"] > 0 for m in seconds)
    assert {"start", "end"} <= {m.get("event") for m in sess if m["type"] == "session"}
    assert stats["chunk_kinds"].get("speech", 0) > 0  # the data channel told them too

    # ... and the mouth in the recording follows the speech (where the engine kept up: conftest)
    require_real_time(collections.Counter(m["kind"] for m in chunks), "the recording's lip sync")
    ev = evaluate(rec)
    assert ev["sync_conf"] > 0.4, ev


@pytest.mark.parametrize("avatar", ["1000"])
def test_unseen_avatar_gets_its_idle_loop(live_server, avatar, tmp_path):
    """A second avatar: its idle loop is made on first use, the session still streams."""
    from conftest import _espeak_wav
    wav = _espeak_wav(tmp_path / "s.wav", "Hello there.")
    stats = run_client(live_server, str(wav), avatar=avatar)
    assert stats["frames_received"] >= stats["audio_s"] * 25


def test_embedding_example_runs(tmp_path):
    """The README's embedding example (clients/embed_example.py): mic in real time -> frames + speech."""
    import subprocess
    import sys

    from conftest import _espeak_wav
    from engine.media import load_audio
    wav = _espeak_wav(tmp_path / "s.wav", "Good evening.", voice="en-us+m2")
    out = tmp_path / "e.mp4"
    r = subprocess.run([sys.executable, "-m", "clients.embed_example", str(wav), str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    frames, audio, _ = read_mp4(out)
    speech_s = len(load_audio(wav, 16000)) / 16000
    assert abs(len(frames) - (speech_s + 0.2) * 25) <= 2 and audio is not None
    assert "speech_frames" in r.stdout
