"""Synthetic training corpus: espeak-ng speech + viseme mouth tracks drawn onto procedural portraits.

`syncavatar data --out DIR --clips N --seed S [--split train|heldout|heldout-id]` writes
DIR/clip_00000.npz ... with
  frames uint8[T,128,128,3] (25 fps), audio float32[S] (16 kHz, augmented: what a microphone gives),
  audio_clean float32[S] (the same speech before augmentation), openness / rounding float32[T],
  blink float32[T], person_mask / face_mask uint8[T,128,128], ref uint8[128,128,3] (reference portrait),
  ref_person_mask / ref_face_mask uint8[128,128], meta (JSON: voice, text, identity, augmentation),
plus DIR/corpus.json (split, seed, clip list). Clips are deterministic for (seed, index).

Splits keep evaluation honest: `heldout` uses voices and sentences that `train` never uses (same
identities); `heldout-id` additionally uses identities that are not in training.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
from pathlib import Path

import numpy as np
from scipy.signal import butter, resample_poly, sosfilt

from engine.data import portraits
from engine.data.speech import SAMPLE_RATE, synthesize
from engine.data.visemes import FPS, mouth_track

TRAIN_LANGS = ["en-us", "en", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-us", "en", "de", "fr", "es"]
TRAIN_VARIANTS = ["", "+m1", "+m2", "+m3", "+m4", "+f1", "+f2", "+f3", "+klatt2", "+max", "+john", "+linda"]
HELDOUT_LANGS = ["en-gb-scotland", "en-us-nyc", "en-gb-x-gbcwmd"]
HELDOUT_VARIANTS = ["+m6", "+m7", "+f4", "+f5", "+Andrea", "+klatt4", "+iven2"]

WORDS = """the a one two three some many every this that my your our their good new old big small long
little great right early young late hot cold happy busy quiet bright dark open simple strong soft
people time year day way man woman child world life hand part place week case point home water room
mother father family story lesson market garden window table paper number music friend river city
morning evening letter doctor teacher picture country mountain summer winter question answer problem
money book door car road ship train house coffee bread apple orange yellow purple basket pocket
is was has had makes takes gives brings finds keeps sees wants needs likes moves pays calls plays
walks talks works opens closes starts stops reads writes buys sells sends helps shows thinks feels
and but or so because when while after before if then also only never always often maybe really
very quite almost about above across against around behind below beside between from into over
under upon with without through toward during until by for of on at in to up down out off
we they he she you I it""".split()

# Held-out sentences (Harvard sentences, public domain); never used for training clips.
HELDOUT_SENTENCES = [
    "The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.", "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.", "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.", "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.", "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.", "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.", "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.", "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.", "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.", "The girl at the booth sold fifty bonds.",
    "The small pup gnawed a hole in the sock.", "The fish twisted and turned on the bent hook.",
    "Press the pants and sew a button on the vest.", "The swan dive was far short of perfect.",
    "The beauty of the view stunned the young boy.", "Two blue fish swam in the tank.",
    "Her purse was full of useless trash.", "The colt reared and threw the tall rider.",
    "It snowed, rained, and hailed the same morning.", "Read verse out loud for pleasure.",
    "Hoist the load to your left shoulder.", "Take the winding path to reach the lake.",
    "Note closely the size of the gas tank.", "Wipe the grease off his dirty face.",
    "Mend the coat before you go out.", "The wrist was badly strained and hung limp.",
    "The stray cat gave birth to kittens.", "The young girl gave no clear response.",
    "The meal was cooked before the bell rang.", "What joy there is in living.",
]
SPLITS = ("train", "heldout", "heldout-id")


def _sentence(rng) -> str:
    n = int(rng.integers(4, 13))
    words = list(rng.choice(WORDS, n))
    text = " ".join(words)
    if rng.random() < 0.4:  # a pause in the middle
        cut = int(rng.integers(2, n - 1))
        text = " ".join(words[:cut]) + ", " + " ".join(words[cut:])
    return text.capitalize() + rng.choice([".", ".", "?", "!"])


def _augment(audio, rng):
    """Microphone-like degradations: gain, phone band-limiting, EQ tilt, room echo, noise, clipping."""
    a = audio.astype(np.float64)
    info = {}
    if rng.random() < 0.3:
        sos = butter(4, [300, 3400], btype="band", fs=SAMPLE_RATE, output="sos")
        a = sosfilt(sos, a)
        info["phone"] = True
    elif rng.random() < 0.4:
        fc = float(rng.uniform(800, 4000))
        kind = "low" if rng.random() < 0.5 else "high"
        sos = butter(1, fc, btype=kind, fs=SAMPLE_RATE, output="sos")
        mix = float(rng.uniform(0.3, 0.8))
        a = (1 - mix) * a + mix * sosfilt(sos, a)
        info["tilt"] = kind
    if rng.random() < 0.3:
        n = int(SAMPLE_RATE * rng.uniform(0.1, 0.4))
        ir = rng.normal(0, 1, n) * np.exp(-np.arange(n) / (n / 5))
        ir[0] = 1.0 / float(rng.uniform(0.05, 0.3))
        wet = np.convolve(a, ir)[:len(a)]
        a = wet / (np.abs(ir).sum() / 8)
        info["reverb"] = True
    peak = np.abs(a).max() + 1e-9
    a = a / peak * 10 ** (rng.uniform(-18, -1) / 20)
    if rng.random() < 0.7:
        snr = float(rng.uniform(12, 40))
        noise = rng.normal(0, 1, len(a))
        if rng.random() < 0.5:  # pink-ish / hum-like: low-passed noise
            noise = sosfilt(butter(1, float(rng.uniform(200, 2000)), fs=SAMPLE_RATE, output="sos"), noise)
        sp = np.sqrt(np.mean(a ** 2)) + 1e-9
        a = a + noise / (np.sqrt(np.mean(noise ** 2)) + 1e-9) * sp * 10 ** (-snr / 20)
        info["snr_db"] = round(snr, 1)
    if rng.random() < 0.05:
        a = np.clip(a * 3, -0.5, 0.5)
        info["clipped"] = True
    return np.clip(a, -1, 1).astype(np.float32), info


def _blinks(n, rng):
    """Blink track float32[T]: lids close over ~5 frames every 2-5 s."""
    b = np.zeros(n, np.float32)
    t = int(rng.integers(10, 90))
    shape = np.array([0.4, 0.9, 1.0, 0.7, 0.3], np.float32)
    while t < n:
        seg = shape[:max(0, min(5, n - t))]
        b[t:t + len(seg)] = seg
        t += int(rng.integers(50, 125))
    return b


def _sway(n, rng, amp=2.0):
    """Smooth small head offset [T, 2] in px, starting at 0 (clips begin in the reference pose)."""
    steps = rng.normal(0, 1, (n + 50, 2))
    k = np.exp(-np.arange(-30, 31) ** 2 / (2 * 10.0 ** 2))
    s = np.stack([np.convolve(steps[:, i], k, mode="same") for i in range(2)], 1)[25:25 + n]
    s = s / (np.abs(s).max() + 1e-6) * rng.uniform(0.3, 1.0) * amp
    ramp = np.clip(np.arange(n) / 12.0, 0, 1)[:, None]
    return (s - s[:1]) * ramp


def make_clip(seed: int, index: int, split: str = "train") -> dict:
    """One deterministic clip (see the module docstring for its keys)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, index, SPLITS.index(split)])
    if split == "train":
        ident = int(rng.choice(portraits.TRAIN_IDENTITIES))
        voice = str(rng.choice(TRAIN_LANGS)) + str(rng.choice(TRAIN_VARIANTS))
    else:
        ident = int(rng.choice(portraits.TRAIN_IDENTITIES if split == "heldout" else portraits.HELDOUT_IDENTITIES))
        voice = str(rng.choice(HELDOUT_LANGS)) + str(rng.choice(HELDOUT_VARIANTS))
    silent = split == "train" and rng.random() < 0.04
    pieces, phonemes, t = [], [], 0.0
    lead = float(rng.uniform(0.15, 0.8))
    pieces.append(np.zeros(int(lead * SAMPLE_RATE), np.float32))
    t += lead
    texts = []
    n_utt = 0 if silent else int(rng.integers(1, 3))
    rate, pitch = int(rng.integers(130, 215)), int(rng.integers(25, 85))
    for u in range(n_utt):
        text = _sentence(rng) if split == "train" else str(rng.choice(HELDOUT_SENTENCES))
        utt = synthesize(text, voice, rate, pitch, int(rng.integers(20, 90)))
        texts.append(text)
        pieces.append(utt.audio)
        phonemes += [(p, s + t, e + t) for p, s, e in utt.phonemes]
        t += len(utt.audio) / SAMPLE_RATE
        gap = float(rng.uniform(0.2, 0.9))
        pieces.append(np.zeros(int(gap * SAMPLE_RATE), np.float32))
        t += gap
    if silent:
        pieces.append(np.zeros(int(rng.uniform(2, 4) * SAMPLE_RATE), np.float32))
    clean = np.concatenate(pieces)
    # speed + pitch together (resampling), as a different talker's tempo would; timings scale with it
    speed = float(rng.uniform(0.9, 1.1)) if rng.random() < 0.5 else 1.0
    if speed != 1.0:
        up = 200
        clean = resample_poly(clean, up, int(round(up * speed))).astype(np.float32)
    audio, aug = _augment(clean, rng) if not silent else (clean + rng.normal(0, 1e-3, len(clean)).astype(np.float32), {})
    n = int(math.ceil(len(clean) / SAMPLE_RATE * FPS))
    openness, rounding = mouth_track(phonemes, n, FPS, time_scale=1.0 / speed)
    blink, sway = _blinks(n, rng), _sway(n, rng)
    idn = portraits.identity(ident)
    frames = np.empty((n, 128, 128, 3), np.uint8)
    person = np.empty((n, 128, 128), np.uint8)
    face = np.empty((n, 128, 128), np.uint8)
    for i in range(n):
        frames[i], person[i], face[i] = portraits.draw(idn, openness[i], rounding[i], blink[i], *sway[i])
    ref, ref_person, ref_face = portraits.draw(idn)
    peak = float(np.abs(clean).max()) + 1e-9
    meta = {"index": index, "seed": seed, "split": split, "identity": ident, "voice": voice, "rate": rate,
            "pitch": pitch, "speed": round(speed, 3), "text": " | ".join(texts), "augment": aug,
            "phonemes": [(p, round(s / speed, 3), round(e / speed, 3)) for p, s, e in phonemes]}
    return {"frames": frames, "audio": audio, "audio_clean": (clean / peak * 0.5).astype(np.float32),
            "openness": openness, "rounding": rounding, "blink": blink, "sway": sway.astype(np.float32),
            "person_mask": person, "face_mask": face, "ref": ref, "ref_person_mask": ref_person.astype(np.uint8),
            "ref_face_mask": ref_face.astype(np.uint8), "meta": np.array(json.dumps(meta))}


def _write(args):
    out, seed, index, split = args
    clip = make_clip(seed, index, split)
    path = Path(out) / f"clip_{index:05d}.npz"
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **clip)
    tmp.replace(path)
    return index, len(clip["openness"])


def build_corpus(out, clips: int, seed: int = 0, split: str = "train", workers: int = 2, progress=True) -> dict:
    """Write clips [0, clips) to out (skipping those already there, so an interrupted run resumes)."""
    from tqdm import tqdm
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [(str(out), seed, i, split) for i in range(clips) if not (out / f"clip_{i:05d}.npz").exists()]
    frames = 0
    # one fresh (forked) process per clip: espeak-ng carries state across utterances (see speech.py)
    with mp.get_context("fork").Pool(workers, maxtasksperchild=1) as pool:
        for _, n in tqdm(pool.imap_unordered(_write, todo), total=len(todo), desc=f"corpus {split}",
                         unit="clip", disable=not progress):
            frames += n
    info = {"split": split, "seed": seed, "clips": clips, "new_clips": len(todo), "new_frames": frames,
            "fps": FPS, "sample_rate": SAMPLE_RATE}
    (out / "corpus.json").write_text(json.dumps(info, indent=1))
    return info
