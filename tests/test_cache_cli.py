"""The cache commands end to end: calibrate writes usable schedules within budget; render with every method."""
import json

import pytest

from synccache import Schedule
from syncavatar.cli import main


def test_calibrate_writes_schedules_within_budget(tmp_path):
    out, stream, peers, plot = (tmp_path / n for n in ("s.json", "stream.json", "peers.json", "errors.png"))
    assert main(["calibrate", "--steps", "4", "--clips", "1", "--budget", "2", "--out", str(out),
                 "--stream-out", str(stream), "--peers-out", str(peers), "--plot", str(plot), "--quiet"]) == 0
    sched = Schedule.load(out)
    assert sched.steps == 4 and 0 < len(sched.cached_spans) <= 2  # the budget is never exceeded
    assert sched.reuse_count > 0 and len(sched.meta["span_errors"]) == 4
    assert sched.meta["forecast"] == 1  # the default: SyncCacheConfig(schedule=...) then forecasts
    assert all(isinstance(v, list) for row in sched.meta["span_errors"] for v in row)  # errors by age
    assert sched.meta["error_weight"] == "face4_mouth16"  # the default: reuse errors weighted to the mouth
    again = tmp_path / "again.json"  # another plan from the recorded errors, no new calibration run
    assert main(["calibrate", "--steps", "4", "--budget", "2", "--errors-from", str(out), "--reuse-fraction",
                 "0.5", "--max-run", "2", "--out", str(again), "--quiet"]) == 0
    s3 = Schedule.load(again)
    assert s3.reuse_count == 3 and s3.meta["errors_from"] == str(out) and s3.meta["forecast"] == 1
    assert s3.meta["span_errors"] == sched.meta["span_errors"] and s3.spans == sched.spans
    assert s3.meta["error_weight"] == "face4_mouth16"  # carried from the file it re-solved
    assert main(["calibrate", "--steps", "4", "--budget", "2", "--errors-from", str(out), "--reuse-fraction",
                 "0.5", "--max-run", "2", "--error-weight", "uniform", "--out", str(again), "--quiet"]) == 2
    assert main(["calibrate", "--steps", "4", "--errors-from", str(out), "--max-run", "9", "--out",
                 str(again), "--quiet"]) == 2  # ages recorded only up to the first run's max run
    s2 = Schedule.load(stream)
    assert s2.cross is not None and len(s2.cached_spans) <= 2 and s2.meta["error_weight"] == "face4_mouth16"
    cal = json.loads(peers.read_text())
    assert cal["steps"] == 4 and cal["samples"] > 0
    assert plot.stat().st_size > 0


@pytest.mark.parametrize("method,threshold", [("fora", "2"), ("fbcache", "0.5"), ("deepcache", None)])
def test_render_with_a_peer_method(tmp_path, speech_wav, method, threshold):
    js = tmp_path / "stats.json"
    args = ["render", "--audio", str(speech_wav), "--out", str(tmp_path / "o.mp4"), "--steps", "6",
            "--json", str(js), "--cache", method, "--quiet"]
    if threshold:
        args += ["--cache-threshold", threshold]
    assert main(args) == 0
    s = json.loads(js.read_text())
    assert s["cache"] == method and s["computed_steps"] + s["reused_steps"] == s["chunks"] * 6


def test_render_synccache_schedule_steps_must_match(tmp_path, speech_wav, capsys):
    code = main(["render", "--audio", str(speech_wav), "--out", str(tmp_path / "o.mp4"), "--steps", "6",
                 "--cache", "synccache", "--quiet"])
    assert code == 2
    assert "solved for 20 steps, not 6" in capsys.readouterr().err


def test_bench_rejects_unknown_methods(capsys):
    assert main(["bench", "cache", "--methods", "warpdrive", "--clips", "1", "--quiet"]) == 2
    assert "unknown bench methods" in capsys.readouterr().err


def test_matched_speed_comparison():
    """Each peer is compared with the SyncCache setting within 10% of its speed that beats it by most."""
    from engine.bench import matched
    rows = [{"method": "none", "setting": "none", "speedup": 1.0, "psnr": 100.0, "sync_conf": 0.8},
            {"method": "synccache", "setting": "a", "speedup": 2.0, "psnr": 33.0, "sync_conf": 0.80},
            {"method": "synccache", "setting": "b", "speedup": 2.15, "psnr": 31.0, "sync_conf": 0.86},
            {"method": "synccache-stream", "setting": "s", "speedup": 2.0, "psnr": 50.0, "sync_conf": 0.9},
            {"method": "fora", "setting": "fora(N=3)", "speedup": 2.1, "psnr": 32.5, "sync_conf": 0.80},
            {"method": "fora", "setting": "fora(N=4)", "speedup": 2.1, "psnr": 32.5, "sync_conf": 0.84},
            {"method": "deepcache", "setting": "deepcache", "speedup": 1.3, "psnr": 50.0, "sync_conf": 0.8}]
    m = {r["peer"]: r for r in matched(rows)}
    assert set(m) == {"fora(N=3)", "fora(N=4)", "deepcache"}  # the extension is not SyncCache's method
    assert m["fora(N=3)"]["synccache"] == "b" and m["fora(N=3)"]["wins"]  # +0.06 sync_conf
    assert m["fora(N=4)"]["synccache"] == "a" and not m["fora(N=4)"]["wins"]  # +0.5 dB, +0.02 at best
    assert m["deepcache"]["synccache"] is None and not m["deepcache"]["wins"]  # nothing near 1.3x
