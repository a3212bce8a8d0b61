"""Two concurrent sessions through one server (issue 14), against one session alone on the same audio.

usage: .venv/bin/python docs/live/two_sessions.py SPEECH.wav OUT.json [--config docs/live/one.toml]

1. One client alone (avatar 0), 2. two clients at once (avatars 0 and 5, the second 1 s later), while a
third tries to join 5 s in. A client the server refuses (503 when the worker's measured capacity is
reached) is recorded with the server's reason. Per session: the client's stats (fps, latency, sync_conf
of what it saw) and, from telemetry, how its speech chunks went (generated at level 0 / 1, skipped, late,
idle) and the batch sizes they were generated in.

docs/live/one.toml: the default config (admission by capacity); docs/live/two.toml: two sessions forced
in (admission off) with a longer playout delay, to measure what they get.
"""
import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

PORT, TELEMETRY = 8093, "tcp://127.0.0.1:5593"
BIN = str(Path(sys.executable).parent / "syncavatar")


def wait_healthy(url, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            time.sleep(1)
    raise RuntimeError("server did not come up")


def client(url, audio, avatar, out_json, log_path):
    return subprocess.Popen([BIN, "client", "--server", url, "--audio", audio, "--avatar", str(avatar),
                             "--json", out_json], stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def chunks_of(csv_path, session):
    kinds, batches = Counter(), Counter()
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            if row.get("type") != "chunk" or row.get("session") != session:
                continue
            kind = row["kind"]
            if kind == "speech":
                kind = f"speech_level{row['level']}"
                batches[row.get("batch") or "?"] += 1
            kinds[kind] += 1
    speech = sum(v for k, v in kinds.items() if k.startswith("speech") or k in ("skipped", "late"))
    return {"kinds": dict(kinds), "batch_sizes": dict(batches),
            "skipped_or_late_pct": round(100 * (kinds["skipped"] + kinds["late"]) / max(1, speech), 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("audio")
    ap.add_argument("out")
    ap.add_argument("--config", default="docs/live/one.toml")
    a = ap.parse_args()
    url = f"http://127.0.0.1:{PORT}"
    tmp = Path(tempfile.mkdtemp(prefix="two_sessions_"))
    log = open(tmp / "log.txt", "w")
    server = subprocess.Popen([BIN, "serve", "--config", a.config, "--port", str(PORT), "--telemetry", TELEMETRY],
                              stdout=log, stderr=subprocess.STDOUT)
    tel = None
    try:
        health = wait_healthy(url)
        tel = subprocess.Popen([BIN, "telemetry", "--address", TELEMETRY, "--csv", str(tmp / "tel.csv"),
                                "--types", "chunk"], stdout=subprocess.DEVNULL, stderr=log)
        time.sleep(1)
        client(url, a.audio, 0, str(tmp / "single.json"), tmp / "single.log").wait()
        time.sleep(4)  # the first session's slot is freed
        first = client(url, a.audio, 0, str(tmp / "first.json"), tmp / "first.log")
        time.sleep(1)
        second = client(url, a.audio, 5, str(tmp / "second.json"), tmp / "second.log")
        time.sleep(5)
        third = subprocess.run([BIN, "client", "--server", url, "--audio", a.audio, "--duration", "2"],
                               capture_output=True, text=True)
        first.wait()
        second.wait()
        time.sleep(2)
        health_after = wait_healthy(url)
    finally:
        if tel is not None:
            tel.terminate()
            tel.wait()
        server.terminate()
        server.wait(timeout=30)
    result = {"config": a.config, "audio": a.audio, "healthz_at_start": health, "healthz_after": health_after}
    for name in ("single", "first", "second"):
        if not (tmp / f"{name}.json").exists():  # refused or failed: the client's last line says why
            result[name] = {"refused": (tmp / f"{name}.log").read_text().strip().splitlines()[-1:]}
            continue
        stats = json.loads((tmp / f"{name}.json").read_text())
        result[name] = {"client": stats, "server_chunks": chunks_of(tmp / "tel.csv", stats["session"])}
    single = result["single"]["client"]["sync_conf"]
    for name in ("first", "second"):
        if "client" in result[name]:
            result[name]["sync_vs_single"] = round(result[name]["client"]["sync_conf"] / single, 3)
    result["third"] = {"returncode": third.returncode, "stderr": third.stderr.strip().splitlines()[-1:]}
    Path(a.out).write_text(json.dumps(result, indent=1))
    for name in ("single", "first", "second"):
        c = result[name].get("client")
        if c is None:
            print(name, "refused:", result[name]["refused"])
            continue
        print(name, "fps", c["fps"], "p50", c["latency_ms_p50"], "p95", c["latency_ms_p95"], "sync", c["sync_conf"],
              result[name]["server_chunks"], "sync vs single", result[name].get("sync_vs_single"))
    print("third:", result["third"])
    keys = ("batch_ms", "sessions_supported", "replicas")
    print("healthz at start / after:", {k: health.get(k) for k in keys}, {k: health_after.get(k) for k in keys})


if __name__ == "__main__":
    main()
