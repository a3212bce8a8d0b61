"""`syncavatar soak`: the report and its thresholds on synthetic timelines (instant), the speech schedule,
the windowed analysis, the client's token and Retry-After, and one real 2-minute soak against the loopback
server (tests/ci.toml)."""
import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from clients import client as C
from clients import soak as S
from syncavatar.cli import main
from engine.config import SoakConfig

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"latency_p95_growth_pct": 10.0, "av_drift_ms": 40.0, "rss_growth_pct": 5.0, "threads_growth": 8,
          "open_files_growth": 8, "min_fps": 20.0, "max_errors": 0}


def _timeline(n=30, interval_s=60.0, change=None):
    """A steady run (450 ms, 25 fps, A/V -20 ms, 700 MB, 20 threads) of n intervals; `change(k, iv)` edits one."""
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        iv = {"lat": list(450 + rng.uniform(-40, 40, 20).round(1)), "fps": 25.0, "av": -20.0, "rss": 700.0,
              "threads": 20, "files": 40, "errors": 0, "late": 0}
        if change:
            change(k, iv)
        per_session = {"s1": {"latencies_ms": iv["lat"], "fps": iv["fps"], "av_offset_ms": iv["av"],
                              "latency_xcorr_ms": 450.0, "onsets_sent": len(iv["lat"]), "frames": 1500}}
        tele = {"latency_est_ms_p50": 530.0, "latency_est_ms_p95": 540.0, "latency_est_n": 150, "fps_out_min": 25.0,
                "late_frames": iv["late"], "dropped_late": 0, "send_av_offset_ms": 0.1, "chunks_speech": 190,
                "chunks_skipped": 0, "chunks_late": 0}
        health = {"rss_mb": iv["rss"], "threads": iv["threads"], "open_files": iv["files"], "cpu_percent": 150.0}
        out.append(S.interval_record(k * interval_s, (k + 1) * interval_s, per_session, tele, health, iv["errors"], 0))
    return out


def _summary(timeline):
    return S.summarize(timeline, LIMITS)


# ----------------------------------------------------------------------------- report and thresholds

def test_a_steady_run_breaks_nothing_and_exits_0(capsys):
    report = _summary(_timeline())
    for k in ("latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "latency_ms_p95_first5", "latency_ms_p95_last5",
              "latency_est_ms_p50", "av_drift_ms", "rss_growth_pct", "threads_growth", "open_files_growth", "fps_min",
              "late_frames", "dropped_late", "errors", "rejected", "timeline", "thresholds", "broken"):
        assert k in report, k
    assert report["broken"] == [] and report["thresholds"] == LIMITS
    assert report["latency_edge_s"] == 300 and "5 minutes" in report["latency_edge_note"]
    assert report["av_drift_ms"] == 0 and report["rss_growth_pct"] == 0 and report["fps_min"] == 25.0
    assert 410 <= report["latency_ms_p50"] <= 490
    assert S.verdict(report) == 0 and capsys.readouterr().out == ""
    json.dumps(report)  # the report is JSON as it is


def test_latency_growing_in_the_last_five_minutes_breaks_its_threshold_and_is_named(capsys):
    def slower_at_the_end(k, iv):
        if k >= 25:
            iv["lat"] = [x * 1.3 for x in iv["lat"]]
    report = _summary(_timeline(change=slower_at_the_end))
    assert report["broken"] == ["latency_p95_growth_pct"]
    assert report["latency_p95_growth_pct"] == pytest.approx(30, abs=3)
    assert S.verdict(report) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("BROKEN latency_p95_growth_pct")


def test_latency_in_the_middle_of_the_run_is_not_an_edge():
    def slow_middle(k, iv):
        if 10 <= k < 20:
            iv["lat"] = [x * 2 for x in iv["lat"]]
    report = _summary(_timeline(change=slow_middle))
    assert report["broken"] == [] and report["latency_ms_p99"] > 800


@pytest.mark.parametrize("name, change", [
    ("rss_growth_pct", lambda k, iv: iv.update(rss=700 + 3.0 * k)),  # +12% by the end
    ("threads_growth", lambda k, iv: iv.update(threads=20 + k // 2)),  # +14
    ("open_files_growth", lambda k, iv: iv.update(files=40 + k)),  # +28: a socket kept per interval
    ("min_fps", lambda k, iv: iv.update(fps=18.5) if k == 17 else None),
    ("av_drift_ms", lambda k, iv: iv.update(av=-20 + 2.5 * k)),  # video later and later: +72 ms
    ("max_errors", lambda k, iv: iv.update(errors=1) if k == 3 else None),
])
def test_each_threshold_breaks_alone_and_is_named(name, change, capsys):
    report = _summary(_timeline(change=change))
    assert report["broken"] == [name]
    assert S.verdict(report) == 1
    assert capsys.readouterr().out.startswith(f"BROKEN {name}: ")


def test_the_warm_up_interval_does_not_count_as_growth():
    report = _summary(_timeline(change=lambda k, iv: iv.update(rss=600.0, threads=9) if k == 0 else None))
    assert report["rss_growth_pct"] == 0 and report["threads_growth"] == 0 and report["broken"] == []


def test_what_was_not_measured_is_broken():
    def nothing(k, iv):
        iv.update(lat=[], av=None, rss=None, threads=None, files=None, fps=None)
    report = _summary(_timeline(n=8, interval_s=15, change=nothing))
    assert set(report["broken"]) == {"latency_p95_growth_pct", "av_drift_ms", "rss_growth_pct", "threads_growth",
                                     "open_files_growth", "min_fps"}
    assert "no latency" in report["broken_detail"]["latency_p95_growth_pct"]


def test_a_short_run_compares_its_first_and_last_fifth_and_says_so():
    report = _summary(_timeline(n=8, interval_s=15.0))  # 2 minutes
    assert report["latency_edge_s"] == 24 and report["av_edge_s"] == 24
    assert "fifth" in report["latency_edge_note"]
    tl = report["timeline"]
    first, last = S._edges(tl, 24)
    assert first == tl[:1] and last == tl[-1:]
    assert S.auto_interval_s(120) == 15 and S.auto_interval_s(1800) == 60


def test_telemetry_counts_increases_of_the_cumulative_counters_of_our_sessions_only():
    counters = {}
    msgs = [{"session": "a", "type": "second", "late_frames": 3, "dropped_late": 1, "fps_out": 25.0},
            {"session": "a", "type": "chunk", "kind": "speech", "latency_est_ms": 530, "av_offset_ms": 0.2},
            {"session": "a", "type": "chunk", "kind": "idle", "latency_est_ms": 900},
            {"session": "a", "type": "chunk", "kind": "error"},
            {"session": "a", "type": "chunk", "kind": "skipped"},
            {"session": "other", "type": "second", "late_frames": 50, "fps_out": 3.0},
            {"session": "a", "type": "second", "late_frames": 5, "dropped_late": 1, "fps_out": 24.0}]
    t = S.telemetry_stats(msgs, {"a": "s1"}, counters)
    assert (t["late_frames"], t["dropped_late"], t["session_errors"]) == (5, 1, 1)
    assert t["latency_est_ms"] == [530.0] and t["fps_out_min"] == 24.0 and t["send_av_offset_ms"] == 0.2
    assert (t["chunks_speech"], t["chunks_skipped"]) == (1, 1)
    t = S.telemetry_stats([{"session": "a", "type": "second", "late_frames": 6, "dropped_late": 1}], {"a": "s1"},
                          counters)
    assert (t["late_frames"], t["dropped_late"]) == (1, 0)  # only what was added since


def test_the_plot_is_written(tmp_path):
    report = _summary(_timeline(n=6))
    S.plot_report(report, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------- CLI

def test_cli_exits_1_with_one_line_per_broken_threshold(monkeypatch, tmp_path, capsys):
    calls = []

    def fake_run_soak(server, minutes, sessions, **kw):
        calls.append((server, minutes, sessions, kw))
        return _summary(_timeline(change=lambda k, iv: iv.update(rss=700 + 3.0 * k, threads=20 + k // 2)))

    monkeypatch.setattr(S, "run_soak", fake_run_soak)
    with pytest.raises(SystemExit) as e:
        main(["soak", "--server", "http://127.0.0.1:9", "--minutes", "30", "--sessions", "2", "--token", "t0k",
              "--telemetry", ""])
    assert e.value.code == 1
    broken = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("BROKEN")]
    assert [ln.split(":")[0] for ln in broken] == ["BROKEN rss_growth_pct", "BROKEN threads_growth"]
    server, minutes, sessions, kw = calls[0]
    assert (minutes, sessions, kw["token"], kw["telemetry"]) == (30.0, 2, "t0k", "")
    assert kw["thresholds"] == SoakConfig()  # the config's [soak]

    monkeypatch.setattr(S, "run_soak", lambda *a, **kw: _summary(_timeline()))
    assert main(["soak", "--minutes", "1"]) == 0


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    assert main(["soak", "--minutes", "0", "--telemetry", ""]) == 2
    assert main(["soak", "--minutes", "1", "--speech", str(tmp_path / "nope.wav"), "--telemetry", ""]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "--minutes" in err[0] and "not found" in err[1]


# ------------------------------------------------------------------------------------------ speech

def _bursts(segments, total_s, sr=C.MIC_RATE, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 1e-4, int(total_s * sr)).astype(np.float32)
    for s, e in segments:
        a[int(s * sr):int(e * sr)] += rng.normal(0, 0.2, int(e * sr) - int(s * sr)).astype(np.float32)
    return a


def test_turn_taking_separates_utterances_by_varied_pauses():
    u = [(np.ones(C.MIC_FRAME * 100) * 3000).astype(np.int16), (np.ones(C.MIC_FRAME * 150) * 3000).astype(np.int16)]
    gen = S.turn_taking(u, np.random.default_rng(1))
    blocks = np.stack([next(gen) for _ in range(50 * 120)])  # two minutes
    loud = np.abs(blocks).max(axis=1) > 0
    edges = np.flatnonzero(np.diff(loud.astype(int)))
    runs = np.diff(np.concatenate([[-1], edges, [len(loud) - 1]]))
    speech, pauses = runs[1::2] * 0.02, runs[2::2][:-1] * 0.02  # the lead silence first
    assert runs[0] * 0.02 == pytest.approx(S.LEAD_S)
    assert set(np.round(speech, 2)) <= {2.0, 3.0} and len(speech) >= 15
    assert np.all((pauses >= S.PAUSE_S[0] - 0.02) & (pauses <= S.PAUSE_S[1] + 0.02))
    assert pauses.std() > 0.5  # varied, not one rhythm
    quiet = S.turn_taking(u, np.random.default_rng(1), speak_until=0.0)  # past the end: silence only
    assert not any(next(quiet).any() for _ in range(50 * 20))


def test_a_long_speech_file_is_cut_into_utterances_at_its_pauses():
    sr = C.MIC_RATE
    segs = [(0.2 + 3.0 * i, 2.6 + 3.0 * i) for i in range(7)]  # 2.4 s phrases, 0.6 s pauses, 21 s
    pieces = S.split_utterances(_bursts(segs, 21.5), sr)
    lengths = [len(p) / sr for p in pieces]
    assert len(pieces) >= 3 and max(lengths) <= S.UTTERANCE_MAX_S
    assert sum(lengths) == pytest.approx(21.5, abs=0.05)
    for p in pieces[:-1]:  # each cut in a pause: the piece ends quiet
        assert np.abs(p[-sr // 50:]).max() < 0.01
    assert S.split_utterances(np.zeros(sr * 3, np.float32), sr) == []  # no speech, no utterance


def test_speech_from_a_directory_of_wavs(tmp_path):
    from engine.media import save_wav
    save_wav(tmp_path / "b.wav", _bursts([(0.2, 1.4)], 1.6, sr=16000), 16000)
    save_wav(tmp_path / "a.wav", _bursts([(0.1, 0.9)], 1.0, sr=22050, seed=1), 22050)
    files = S.speech_files(str(tmp_path))
    assert [f.name for f in files] == ["a.wav", "b.wav"]
    u = S.load_utterances(files)
    assert [len(x) / C.MIC_RATE for x in u] == pytest.approx([1.0, 1.6], abs=0.021)
    assert all(x.dtype == np.int16 and len(x) % C.MIC_FRAME == 0 for x in u)
    (tmp_path / "empty").mkdir()
    with pytest.raises(C.ClientError, match="no .wav"):
        S.speech_files(str(tmp_path / "empty"))


# --------------------------------------------------------------------------------- windowed analysis

def _window_session(delay=0.45, t0=100.0, total_s=30.0):
    """Sent blocks with phrases after pauses, frames (25 fps) whose mouth follows them `delay` later."""
    segs = [(1.0 + 5.0 * i, 3.0 + 5.0 * i) for i in range(6)]
    audio = _bursts(segs, total_s)
    pcm = (audio * 32767).astype(np.int16).reshape(-1, C.MIC_FRAME)
    sent_t = t0 + np.arange(len(pcm)) * 0.02
    ft = t0 + np.arange(int(total_s * 25)) / 25
    x = ft - t0 - delay
    openness = 0.1 + 0.6 * np.array([any(s <= v < e for s, e in segs) for v in x], float)
    return sent_t, list(pcm), ft, openness, [t0 + s for s, _ in segs]


def test_an_interval_counts_the_onsets_sent_in_its_window_and_their_latency():
    sent_t, pcm, ft, openness, onsets = _window_session()
    w = dict(sent_t=sent_t, sent_pcm=pcm, seen_t=ft, seen_o=openness, heard=np.zeros(0), heard_t0=None,
             spans=[[ft[0] - 0.5, ft[0], None]], a=100.0, b=130.0, since=104.0, until=118.0)
    out = S.analyse_window(**w)
    assert out["onsets_sent"] == 3  # 106, 111, 116
    assert out["latencies_ms"] == pytest.approx([450] * 3, abs=45)
    assert out["fps"] == pytest.approx(25, abs=0.1)
    assert S.covered_s([[100.0, None, None]], 100.0, 130.0) == 30 - S.FIRST_FRAME_GRACE_S  # no frame: counts anyway


def test_a_session_keeps_only_a_short_window_between_intervals():
    """What a 30-minute soak holds per session is bounded: after each interval only CARRY_S before the next
    interval's first onset is kept, and received frames are never held (only their openness)."""
    sent_t, pcm, ft, openness, _ = _window_session(total_s=30.0)
    c = S.SoakClient("s1", "http://127.0.0.1:9", True, [], seed=0)
    for t, p in zip(sent_t, pcm):
        c._on_sent(p, t)
    c.absorb(ft, openness)
    w = c.window(100.0, 130.0, final=False)
    assert w["until"] == 130.0 - C.MATCH_WINDOW_S and w["since"] == -np.inf
    c.advance(w["until"])
    assert c.onsets_from == w["until"]
    keep = w["until"] - S.CARRY_S
    assert c.sent[0][0] >= keep and len(c.sent) <= (130 - keep) * 50 + 1
    assert c.seen_t[0] >= keep and len(c.seen_t) <= (130 - keep) * 25 + 1 and not c.heard
    assert c.window(130.0, 160.0, final=True)["until"] == 160.0  # the last interval takes every onset


def test_the_received_audio_plays_on_across_intervals():
    """Read piece by piece, the player's timeline is the one of the whole run: an interval's first
    arrival (jittery) does not move its audio, which would show up as A/V offset noise."""
    rng = np.random.default_rng(0)
    chunks = [np.full(320, k, np.float32) for k in range(300)]
    times = 50.0 + np.arange(300) * 0.02 + rng.uniform(0, 0.03, 300)
    times[150:] += 0.25  # a stall: the player runs dry once
    whole, t0 = C.audio_timeline(chunks, times)
    first, s1 = C.audio_timeline(chunks[:100], times[:100])
    second, s2 = C.audio_timeline(chunks[100:], times[100:], player=(s1, len(first)))
    assert s1 == t0 and s2 == pytest.approx(t0 + len(first) / C.REC_RATE)
    assert np.array_equal(np.concatenate([first, second]), whole)


# ------------------------------------------------------------------------------- token, Retry-After

async def _stub(handlers):
    app = web.Application()
    for method, path, fn in handlers:
        app.router.add_route(method, path, fn)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


def test_token_is_sent_and_a_503_surfaces_its_retry_after(tmp_path):
    from engine.media import save_wav
    wav = tmp_path / "s.wav"
    save_wav(wav, _bursts([(0.1, 0.4)], 0.5, sr=16000), 16000)
    seen = []

    async def offer(request):
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"error": "server full: 1 sessions already running"}, status=503,
                                 headers={"Retry-After": "7"})

    async def delete(request):
        seen.append(request.headers.get("Authorization"))
        return web.json_response({})

    async def scenario():
        runner, port = await _stub([("POST", "/offer", offer), ("DELETE", "/sessions/{sid}", delete)])
        try:
            with pytest.raises(C.ClientError) as e:
                await C.run_client_async(f"http://127.0.0.1:{port}", str(wav), token="s3cret")
            import aiohttp
            async with aiohttp.ClientSession() as http:
                await C._delete_session(http, f"http://127.0.0.1:{port}", "abc", token="s3cret")
            return e.value
        finally:
            await runner.cleanup()

    err = asyncio.run(scenario())
    assert (err.status, err.retry_after) == (503, 7.0)
    assert "HTTP 503" in str(err) and "retry after 7 s" in str(err)
    assert seen == ["Bearer s3cret", "Bearer s3cret"]


def test_no_token_sends_no_authorization_header():
    assert C._auth(None) == {} and C._auth("") == {}
    assert C._retry_after("5") == 5.0 and C._retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None


# ------------------------------------------------------------------------------------- a real soak

def test_a_two_minute_soak_against_the_live_server(live_server_proc, tmp_path):
    js, png = tmp_path / "soak.json", tmp_path / "soak.png"
    r = subprocess.run([sys.executable, "-m", "syncavatar.cli", "soak", "--server", live_server_proc.url,
                        "--telemetry", live_server_proc.telemetry, "--minutes", "2", "--sessions", "1",
                        "--json", str(js), "--plot", str(png), "--config", str(ROOT / "tests" / "ci.toml")],
                       cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert r.returncode in (0, 1), r.stderr[-3000:]
    report = json.loads(js.read_text())
    for k in ("latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "latency_ms_p95_first5", "latency_ms_p95_last5",
              "latency_est_ms_p50", "av_drift_ms", "rss_growth_pct", "threads_growth", "open_files_growth", "fps_min",
              "late_frames", "dropped_late", "errors", "rejected", "timeline", "thresholds", "broken"):
        assert k in report, k
    assert report["errors"] == 0, report["errors_detail"]
    assert report["fps_min"] >= 20
    assert report["latency_ms_p50"] is not None and report["onsets"] > 0
    assert report["latency_est_ms_p50"] is not None  # the telemetry was heard
    assert report["rss_growth_pct"] is not None and all(iv["rss_mb"] for iv in report["timeline"])
    assert len(report["timeline"]) >= 4  # one progress line per interval
    assert sum(ln.startswith("[") for ln in r.stdout.splitlines()) == len(report["timeline"])
    assert png.read_bytes()[:4] == b"\x89PNG"
    broken = [ln for ln in r.stdout.splitlines() if ln.startswith("BROKEN")]  # exit 1 iff named
    assert (r.returncode == 1) == bool(report["broken"]) and len(broken) == len(report["broken"])
