"""Shared fixtures: short espeak-ng speech clips written to temporary files."""
import shutil
import subprocess

import pytest


def _espeak_wav(path, text, voice="en-gb-scotland+m7"):
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is required for the tests (apt-get install espeak-ng)")
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
    return path


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory):
    """A held-out voice and sentence (not in the training corpus), 22050 Hz mono as espeak writes it."""
    return _espeak_wav(tmp_path_factory.mktemp("audio") / "speech.wav", "Wipe the grease off his dirty face.")


@pytest.fixture(scope="session")
def rendered(tmp_path_factory, speech_wav):
    """speech_wav rendered once with the shipped model: (mp4 path, stats dict, frames npy path)."""
    import json

    from syncavatar.cli import main
    d = tmp_path_factory.mktemp("render")
    out, js, fr = d / "out.mp4", d / "stats.json", d / "frames.npy"
    rc = main(["render", "--audio", str(speech_wav), "--avatar", "3", "--out", str(out), "--json", str(js),
               "--frames-out", str(fr), "--quiet"])
    assert rc == 0
    return out, json.loads(js.read_text()), fr
