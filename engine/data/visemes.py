"""Phonemes -> visemes -> a mouth-shape track at 25 fps (openness and rounding in [0, 1]).

espeak-ng reports phonemes as its ASCII mnemonics ('p', 'aI', '@', '_:' ...). Each maps to a viseme
class with a target mouth openness and lip rounding; the track places each target at its phoneme's
middle, interpolates between them and smooths a little (coarticulation).
"""
from __future__ import annotations

import numpy as np

from engine.audio import FPS

# viseme class -> (openness, rounding)
VISEMES = {
    "rest": (0.0, 0.0),  # pauses
    "closed": (0.0, 0.1),  # p b m: lips pressed together
    "labiodental": (0.12, 0.0),  # f v
    "round_cons": (0.15, 0.9),  # w
    "dental": (0.25, 0.0),  # th
    "postalveolar": (0.25, 0.6),  # sh zh ch j
    "consonant": (0.3, 0.1),  # t d n s z l r k g ng h y ...
    "open": (0.95, 0.0),  # a, A, V, aI, aU
    "mid": (0.6, 0.0),  # E, e, eI, e@, 3
    "schwa": (0.45, 0.0),  # @
    "close_front": (0.38, 0.0),  # i, I
    "mid_round": (0.7, 0.7),  # o, O, 0, oU
    "close_round": (0.32, 0.9),  # u, U
}

_VOWEL_CHARS = set("aeiouAEIOUV03@y")


def viseme(phoneme: str) -> str:
    """espeak-ng mnemonic -> viseme class name."""
    p = phoneme.strip("'," ).replace(":", "").replace(";", "")
    if not p or p.startswith("_"):
        return "rest"
    c = p[0]
    if c in "pbm":
        return "closed"
    if c in "fv":
        return "labiodental"
    if c == "w" or p == "W":
        return "round_cons"
    if c in "TD":
        return "dental"
    if c in "SZ" or p in ("tS", "dZ"):
        return "postalveolar"
    if c in "aAV":
        return "open"
    if c == "@":
        return "open" if p.startswith("@U") else "schwa"
    if c in "Ee3":
        return "mid"
    if c in "iIy":
        return "close_front"
    if c in "oO0Q":
        return "mid_round"
    if c in "uU":
        return "close_round"
    return "schwa" if c in _VOWEL_CHARS else "consonant"


def mouth_track(phonemes, n_frames: int, fps: float = FPS, smooth: float = 0.6,
                time_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """[(phoneme, start_s, end_s)] -> (openness float32[T], rounding float32[T]) sampled at frame centres.

    time_scale multiplies the phoneme times (for speed-augmented audio); smooth is a Gaussian sigma in
    frames.
    """
    times, opens, rounds = [0.0], [0.0], [0.0]
    for name, s, e in phonemes:
        s, e = s * time_scale, e * time_scale
        o, r = VISEMES[viseme(name)]
        if e - s > 0.12:  # long phoneme (vowel or pause): hold the target over its span
            times += [s + 0.04, e - 0.04]
            opens += [o, o]
            rounds += [r, r]
        else:
            times.append(0.5 * (s + e))
            opens.append(o)
            rounds.append(r)
    t = (np.arange(n_frames) + 0.5) / fps
    order = np.argsort(np.asarray(times), kind="stable")
    tt = np.asarray(times)[order]
    op = np.interp(t, tt, np.asarray(opens)[order], right=0.0)
    ro = np.interp(t, tt, np.asarray(rounds)[order], right=0.0)
    if smooth > 0 and n_frames > 1:
        r = np.arange(-3, 4)
        k = np.exp(-r ** 2 / (2 * smooth ** 2))
        k /= k.sum()
        op = np.convolve(np.pad(op, 3, mode="edge"), k, mode="valid")
        ro = np.convolve(np.pad(ro, 3, mode="edge"), k, mode="valid")
    return np.clip(op, 0, 1).astype(np.float32), np.clip(ro, 0, 1).astype(np.float32)
