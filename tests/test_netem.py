"""Network faults: server and client in their own network namespaces, over a veth pair that delays every
packet 80 +- 20 ms and loses 3%, each direction (netem where the kernel has it, else the client's UDP
impaired in user space: see tests/netfault.py). The stream must keep its frame rate, a bounded latency,
lips that follow the speech, and the whole utterance (the lips only where the engine generated 90% of the
speech chunks on time: conftest.require_real_time)."""
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import require_real_time
from netfault import RESULT_TAG, SERVER_ADDR, Impairment, NamespacesUnavailable, NetnsPair

ROOT = Path(__file__).resolve().parents[1]
PORT = 8080  # the server's namespace is fresh: any port is free there
FAULT = Impairment(delay_ms=80, jitter_ms=20, loss=0.03)  # each direction

# The server config, laid over configs/default.toml: tests/ci.toml's settings (back-to-back sessions, 800 ms
# playout delay for 2 shared cores) on the veth address, telemetry off (nobody listens to it here).
CONFIG = f"""
[server]
host = "{SERVER_ADDR}"
host_candidates = ["{SERVER_ADDR}"]
telemetry = ""
max_sessions = 2
max_sessions_per_client = 2

[live]
playout_delay_ms = 800
"""

MIN_FPS = 20.0
# Glass to glass over the clean veth under these settings is ~0.9 s (800 ms playout delay, jitter buffers,
# decoding). The faulty link adds up to 100 ms each way (the mic's audio in, the video out). aiortc's audio
# jitter buffer (16 packets) waits on a lost packet until 16 later ones have come, and stays that full
# after it, so the first lost mic packet adds up to 320 ms for the rest of the session; a lost video packet
# costs a retransmission (NACK, another round trip, ~200 ms). 0.9 + 0.2 + 0.32 + 0.2 = ~1.6 s; measured
# here: p95 0.94-1.76 s over 18 sessions (speech-to-mouth lag +370-450 ms against the clean link).
# 2000 ms keeps some room for a loaded machine; a stream that stalls or keeps falling behind exceeds it.
MAX_LATENCY_P95_MS = 2000.0
# The lip-sync expert on what came back: the loopback test asks for 0.4 (recordings score ~0.8 there).
# Lost packets cost frames and audio, so the floor here is lower (measured 0.44-0.79 over 18 sessions),
# yet far above a mouth that does not follow the speech (~0).
MIN_SYNC_CONF = 0.3
CLIENT_TIMEOUT_S = 400  # server start (~10 s, more under load) + connect + ~6 s of speech + analysis


@pytest.fixture
def net():
    """Two fresh network namespaces joined by a veth pair; skipped only where they cannot be made."""
    try:
        pair = NetnsPair().open()
    except NamespacesUnavailable as e:
        if os.environ.get("CI"):  # as for the other system tools: CI runs as root and must run this
            pytest.fail(f"network namespaces are required in CI: {e}")
        pytest.skip(f"cannot make network namespaces: {e}")
    yield pair
    pair.close()  # also kills what is left in them (the generation worker)


def test_stream_survives_delay_jitter_and_loss(net, tmp_path, record_property):
    from conftest import _espeak_wav
    wav = _espeak_wav(tmp_path / "s.wav", "The boat sailed slowly past the old harbour wall. Nobody on board "
                      "looked back. Then the rain came.", voice="en-us+m4")  # ~6.8 s, three onsets
    cfg = tmp_path / "netem.toml"
    cfg.write_text(CONFIG)
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            net.exec(net.server, sys.executable, "-m", "syncavatar.cli", "serve", "--config", str(cfg),
                     "--port", str(PORT)),
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            clean = _run_client(net, server, tmp_path, wav, "clean", shim=False)["stats"]  # the same link, unimpaired
            netem, why = net.try_netem(FAULT)
            mode = "netem" if netem else f"user-space UDP shim in the client (no netem here: {why})"
            record_property("impairment", f"{FAULT.describe()}, by {mode}")
            print(f"impairment: {FAULT.describe()}, by {mode}")
            result = _run_client(net, server, tmp_path, wav, "faulty", shim=not netem)
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=20)
    stats = result["stats"]
    counters = net.netem_counters() if netem else result["shim"]
    record_property("counters", json.dumps(counters))
    print("impairment counters:", json.dumps(counters))
    print("client stats, clean link:", json.dumps(clean))
    print("client stats, faulty link:", json.dumps(stats))

    # the impairment was real: packets were lost and delayed, each direction ...
    if netem:
        for direction, q in counters.items():
            assert q["packets"] > 100 and q["drops"] > 0, (direction, q)
    else:
        assert counters["dropped_out"] > 0 and counters["dropped_in"] > 0, counters
        assert counters["delayed_out"] > 100 and counters["delayed_in"] > 100, counters
        lost = (counters["dropped_out"] + counters["dropped_in"]) / (counters["sent"] + counters["received"])
        assert 0.01 < lost < 0.06, counters
        assert FAULT.delay_ms - FAULT.jitter_ms <= counters["delay_ms_min"] <= counters["delay_ms_max"] \
            <= FAULT.delay_ms + FAULT.jitter_ms, counters
    # ... and the stream held up
    assert not stats["disconnected"], stats
    assert stats["frames_received"] >= stats["audio_s"] * 25, stats  # the whole utterance came back
    assert stats["fps"] >= MIN_FPS, stats
    assert stats["latency_ms_p95"] is not None and stats["latency_ms_p95"] < MAX_LATENCY_P95_MS, stats
    assert stats["audio_received_s"] >= stats["audio_s"], stats  # the speech came back too

    # ... and seen end to end in the mouths (where the engine kept up on both runs: conftest): speech goes in
    # and the mouth comes out over the link, each way at least delay - jitter = 60 ms later (the
    # speech-to-mouth lag from cross-correlation; grid 10 ms), and the lips follow the speech
    require_real_time(Counter(clean["chunk_kinds"]) + Counter(stats["chunk_kinds"]), "the mouths' latency and sync")
    assert None not in (stats["latency_xcorr_ms"], clean["latency_xcorr_ms"]), (clean, stats)
    assert stats["latency_xcorr_ms"] >= clean["latency_xcorr_ms"] + 2 * (FAULT.delay_ms - FAULT.jitter_ms) - 20, \
        (clean, stats)
    assert stats["sync_conf"] is not None and stats["sync_conf"] > MIN_SYNC_CONF, stats


def _run_client(net, server, tmp_path, wav, name, shim):
    """tests/netfault.py's client end in the client namespace -> its result JSON; fails at once if the server dies."""
    log_path = tmp_path / "serve.log"
    cmd = net.exec(net.client, sys.executable, str(ROOT / "tests" / "netfault.py"), "client",
                   f"http://{SERVER_ADDR}:{PORT}", str(wav), "--wait-ready", "180",
                   "--delay-ms", str(FAULT.delay_ms), "--jitter-ms", str(FAULT.jitter_ms), "--loss", str(FAULT.loss),
                   *(["--shim"] if shim else []))
    out_path, err_path = tmp_path / f"client-{name}.out", tmp_path / f"client-{name}.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:  # files, not pipes: nobody reads them meanwhile
        client = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err)
    end = time.monotonic() + CLIENT_TIMEOUT_S
    try:
        while client.poll() is None:
            if server.poll() is not None:
                pytest.fail(f"server exited with {server.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > end:
                pytest.fail(f"client did not finish within {CLIENT_TIMEOUT_S} s:\n{_tail(log_path)}")
            time.sleep(0.5)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    lines = [ln for ln in out_path.read_text().splitlines() if ln.startswith(RESULT_TAG)]
    assert client.returncode == 0 and lines, \
        f"client failed ({client.returncode}):\n{_tail(err_path, 3000)}\nserver log:\n{_tail(log_path)}"
    return json.loads(lines[-1][len(RESULT_TAG):])


def _tail(path, n=4000):
    return Path(path).read_text()[-n:]
