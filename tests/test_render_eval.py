"""Offline render and the lip-sync evaluator end to end, and their error paths."""
import json
import math

import numpy as np
import pytest

from engine.lipsync import peak_corr, pearson
from engine.media import load_audio, read_mp4
from syncavatar.cli import main


def test_render_round_trip(rendered, speech_wav):
    out, stats, frames_npy = rendered
    audio = load_audio(speech_wav, 16000)
    audio_s = len(audio) / 16000
    for key in ("frames", "chunks", "audio_s", "steps", "dit_ms", "total_ms", "rtf"):
        assert key in stats
    assert stats["steps"] >= 20
    frames, own_audio, fps = read_mp4(out)
    assert fps == 25
    assert abs(len(frames) - math.ceil(audio_s * 25)) <= 1
    assert abs(len(own_audio) / 16000 - audio_s) < 0.1  # audio duration kept
    saved = np.load(frames_npy)
    assert saved.dtype == np.uint8 and saved.shape == (stats["frames"], 128, 128, 3)
    # the mp4 is lossy, but close to the exact frames
    assert np.abs(saved.astype(float) - frames[:len(saved)]).mean() < 6


def test_render_is_deterministic_for_a_seed(tmp_path, speech_wav):
    outs = []
    for i in range(2):
        f = tmp_path / f"f{i}.npy"
        assert main(["render", "--audio", str(speech_wav), "--avatar", "1", "--out", str(tmp_path / f"{i}.mp4"),
                     "--steps", "4", "--frames-out", str(f), "--quiet"]) == 0
        outs.append(np.load(f))
    assert np.array_equal(outs[0], outs[1])


def test_eval_on_rendered_clip(rendered, capsys):
    out, _, _ = rendered
    assert main(["eval", "--video", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("sync_conf", "offset_frames", "env_corr", "frames", "audio_s"):
        assert key in res
    assert -1 <= res["sync_conf"] <= 1 and abs(res["offset_frames"]) <= 10


def test_peak_corr_finds_lag():
    rng = np.random.default_rng(0)
    ref = np.convolve(rng.random(200), np.ones(3) / 3, mode="same")
    video = np.concatenate([np.zeros(2), ref[:-2]])  # video 2 frames late
    conf, off = peak_corr(video, ref)
    assert off == 2 and conf > 0.99
    assert pearson(np.ones(10), ref[:10]) == 0.0


@pytest.mark.parametrize("content", [None, b"", b"this is not audio at all" * 10])
def test_render_bad_audio_exits_2(tmp_path, content, capsys):
    path = tmp_path / "bad.wav"
    if content is not None:
        path.write_bytes(content)
    rc = main(["render", "--audio", str(path), "--out", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "error" in err
    assert not (tmp_path / "o.mp4").exists()


def test_render_unknown_avatar_exits_2(tmp_path, speech_wav, capsys):
    rc = main(["render", "--audio", str(speech_wav), "--avatar", "bob", "--out", str(tmp_path / "o.mp4")])
    assert rc == 2 and "avatar" in capsys.readouterr().err


def test_eval_missing_video_exits_2(tmp_path, capsys):
    rc = main(["eval", "--video", str(tmp_path / "nope.mp4")])
    assert rc == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("text", ["[model\nsteps = 3", "[model]\nstepz = 3", "[model]\nsteps = 'many'"])
def test_render_bad_config_exits_2(tmp_path, speech_wav, text, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    rc = main(["render", "--audio", str(speech_wav), "--config", str(cfg), "--out", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "error" in err


def test_render_with_synccache_reports_reuse(tmp_path, speech_wav):
    stats = {}
    for cache in ("none", "synccache"):
        js = tmp_path / f"{cache}.json"
        args = ["render", "--audio", str(speech_wav), "--out", str(tmp_path / f"{cache}.mp4"), "--steps", "8",
                "--json", str(js), "--cache", cache, "--quiet"]
        if cache == "synccache":
            args += ["--cache-threshold", "100"]  # reuse whenever warm-up and the consecutive cap allow
        assert main(args) == 0
        stats[cache] = json.loads(js.read_text())
    n_steps = stats["none"]["chunks"] * 8
    assert stats["none"]["cache"] == "none" and stats["none"]["computed_steps"] == n_steps
    assert stats["none"]["reused_steps"] == 0
    s = stats["synccache"]
    assert s["cache"] == "synccache" and s["reused_steps"] > 0
    assert s["computed_steps"] + s["reused_steps"] == n_steps
