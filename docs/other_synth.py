"""Speech from another synthesizer family (CMU Flite, not espeak-ng) as bench clips: clean, noisy, phone-band.

    apt-get install flite
    .venv/bin/python docs/other_synth.py data/flite 6
    .venv/bin/python docs/select_default_schedule.py data/flite 6 68:1 docs/bench_cache_flite.json

The model and the calibration never heard Flite. Each clip: one Flite voice (kal, awb, rms, slt) saying two
sentences that are in no corpus, with pauses, rendered by a training identity; variant 0 clean, 1 noise at
15 dB SNR, 2 telephone band (300-3400 Hz). There is no truth openness: `openness` is zeros and only sets the
clip's length (the bench measures sync_conf with the expert, not gt_corr).
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.signal import butter, sosfilt

from engine.data import portraits
from engine.media import load_audio

SENTENCES = ["The ferry left the harbour an hour before the storm reached the coast.",
             "Please bring the blue folder and two pencils to the meeting room.",
             "A quiet garden grew behind the old library on the hill.",
             "We counted forty seven boxes, but the truck could carry only thirty.",
             "Her brother fixed the clock with a tiny screwdriver and a lot of patience.",
             "Turn left at the bakery, then walk until you see the red bridge."]
VOICES = ["kal", "awb", "rms", "slt"]


def flite(text, voice):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.wav"
        subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(path)], check=True)
        return load_audio(path, 16000)


def degrade(a, variant, rng):
    if variant == 1:
        noise = rng.normal(0, 1, len(a))
        return a + noise * np.sqrt(np.mean(a ** 2)) * 10 ** (-15 / 20)
    if variant == 2:
        return sosfilt(butter(4, [300, 3400], btype="band", fs=16000, output="sos"), a)
    return a


def main(out, n):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    for i in range(n):
        voice, variant = VOICES[i % len(VOICES)], i % 3
        texts = [SENTENCES[i % len(SENTENCES)], SENTENCES[(i + 2) % len(SENTENCES)]]
        pieces = [np.zeros(int(16000 * rng.uniform(0.2, 0.6)), np.float32)]
        for t in texts:
            pieces += [flite(t, voice), np.zeros(int(16000 * rng.uniform(0.3, 0.8)), np.float32)]
        a = degrade(np.concatenate(pieces).astype(np.float64), variant, rng)
        a = (a / (np.abs(a).max() + 1e-9) * 0.5).astype(np.float32)
        ident = int(rng.choice(portraits.TRAIN_IDENTITIES))
        ref, person, face = portraits.reference(ident)
        meta = {"index": i, "split": "flite", "identity": ident, "voice": f"flite-{voice}",
                "variant": ["clean", "noise15dB", "phone"][variant], "text": " | ".join(texts)}
        np.savez_compressed(out / f"clip_{i:05d}.npz", audio=a, ref=ref, ref_person_mask=person.astype(np.uint8),
                            ref_face_mask=face.astype(np.uint8), openness=np.zeros(int(np.ceil(len(a) / 640)), np.float32),
                            meta=np.array(json.dumps(meta)))
        print(meta)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
