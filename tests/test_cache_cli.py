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
    s2 = Schedule.load(stream)
    assert s2.cross is not None and len(s2.cached_spans) <= 2
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
