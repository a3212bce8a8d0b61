"""Procedural portraits: an identity (face shape, skin, hair, eyes, clothing, textured background) drawn
at 128x128 with a given mouth openness/rounding, blink and head offset.

Shapes are soft-edged (anti-aliased) ellipses and polygons composited in numpy. Identity numbers
0..23 are the training identities; any other number (1000, 1001, ...) is a new, held-out portrait.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

SIZE = 128
TRAIN_IDENTITIES = tuple(range(24))
HELDOUT_IDENTITIES = (1000, 1001, 1002)

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)

SKIN = [(255, 224, 196), (241, 194, 160), (224, 172, 128), (198, 134, 94), (160, 102, 68),
        (120, 78, 52), (88, 57, 40), (232, 190, 172)]
HAIR = [(20, 18, 16), (60, 40, 25), (110, 70, 35), (170, 120, 60), (220, 190, 120), (140, 40, 20),
        (120, 120, 120), (230, 230, 225)]
EYES = [(60, 40, 20), (40, 90, 140), (50, 110, 60), (90, 70, 40), (30, 30, 30)]


@dataclass
class Identity:
    """Everything that makes one avatar look like itself."""
    ident: int
    skin: np.ndarray
    hair: np.ndarray
    hair_style: int  # 0 short cap, 1 long (behind the shoulders), 2 bun-ish top, 3 very short
    eye: np.ndarray
    cloth: np.ndarray
    cloth2: np.ndarray
    lip: np.ndarray
    face_cx: float
    face_cy: float
    face_rx: float
    face_ry: float
    eye_dx: float  # half distance between the eyes
    eye_dy: float  # eye height above face centre
    eye_r: float
    mouth_w: float  # half width of the closed mouth
    mouth_dy: float  # mouth below face centre
    shoulder: float  # shoulder half width
    background: np.ndarray  # float32 [128, 128, 3] in 0..255


def _background(rng) -> np.ndarray:
    """Static textured background: gradient + one pattern + fixed fine noise."""
    c1, c2 = rng.uniform(30, 230, 3), rng.uniform(30, 230, 3)
    ang = rng.uniform(0, np.pi)
    g = (np.cos(ang) * _XX + np.sin(ang) * _YY) / SIZE
    g = (g - g.min()) / (g.max() - g.min() + 1e-6)
    bg = c1 * (1 - g[..., None]) + c2 * g[..., None]
    kind = rng.integers(4)
    col = rng.uniform(20, 235, 3)
    if kind == 0:  # stripes
        period, phase, a = rng.uniform(10, 30), rng.uniform(0, 6.3), rng.uniform(0, np.pi)
        s = 0.5 + 0.5 * np.sin((np.cos(a) * _XX + np.sin(a) * _YY) * 2 * np.pi / period + phase)
        bg = bg * (1 - 0.35 * s[..., None]) + col * 0.35 * s[..., None]
    elif kind == 1:  # blobs
        for _ in range(rng.integers(3, 7)):
            cx, cy, r = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(8, 30)
            m = np.clip((r - np.hypot(_XX - cx, _YY - cy)) / 3, 0, 1)[..., None] * 0.6
            bg = bg * (1 - m) + rng.uniform(20, 235, 3) * m
    elif kind == 2:  # window / shelf rectangles
        for _ in range(rng.integers(2, 5)):
            x0, y0 = rng.uniform(0, 110, 2)
            w, h = rng.uniform(10, 40, 2)
            m = ((_XX > x0) & (_XX < x0 + w) & (_YY > y0) & (_YY < y0 + h)).astype(np.float32)[..., None] * 0.7
            bg = bg * (1 - m) + rng.uniform(20, 235, 3) * m
    else:  # soft checker
        p = rng.uniform(12, 24)
        s = ((np.floor(_XX / p) + np.floor(_YY / p)) % 2)[..., None] * 0.25
        bg = bg * (1 - s) + col * s
    bg = bg + rng.normal(0, rng.uniform(2, 7), (SIZE, SIZE, 1)).astype(np.float32)
    return np.clip(bg, 0, 255).astype(np.float32)


MAX_IDENTITY = 999_999  # identity numbers are 0..MAX_IDENTITY
_ID_CHARS = 9  # the longest avatar id accepted ("id" + 6 digits + one spare)


def identity_number(avatar_id) -> int:
    """The identity an avatar id names ("3", "id3", 1000); ValueError with a one-line reason if none.
    The reason quotes at most a short prefix of what was given (ids come from the network)."""
    text = str(avatar_id)
    shown = repr(text[:12] + ("..." if len(text) > 12 else ""))
    digits = text.removeprefix("id")
    if len(text) > _ID_CHARS or not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"unknown avatar {shown}: expected an identity number 0..{MAX_IDENTITY} such as 3 or 1000")
    ident = int(digits)
    if ident > MAX_IDENTITY:
        raise ValueError(f"unknown avatar {shown}: identity numbers are 0..{MAX_IDENTITY}")
    return ident


def canonical_avatar(avatar_id) -> str:
    """The one spelling of an avatar id ("03", "id3" and 3 are all "3"); ValueError as identity_number."""
    return str(identity_number(avatar_id))


def identity(ident: int) -> Identity:
    """Deterministic identity from its number."""
    rng = np.random.default_rng([ident, 7919])
    pick = lambda pal: np.asarray(pal[rng.integers(len(pal))], np.float32) + rng.normal(0, 6, 3).astype(np.float32)
    skin = pick(SKIN)
    return Identity(
        ident=ident, skin=skin, hair=pick(HAIR), hair_style=int(rng.integers(4)), eye=pick(EYES),
        cloth=rng.uniform(20, 235, 3).astype(np.float32), cloth2=rng.uniform(20, 235, 3).astype(np.float32),
        lip=np.clip(skin * np.array([0.85, 0.55, 0.55]) + np.array([30, 0, 5]), 0, 255).astype(np.float32),
        face_cx=64 + rng.uniform(-3, 3), face_cy=rng.uniform(52, 57), face_rx=rng.uniform(22, 27),
        face_ry=rng.uniform(28, 33), eye_dx=rng.uniform(9, 12), eye_dy=rng.uniform(5, 9),
        eye_r=rng.uniform(3.0, 4.2), mouth_w=rng.uniform(7, 10), mouth_dy=rng.uniform(15, 18),
        shoulder=rng.uniform(40, 56), background=_background(rng))


def _ellipse(cx, cy, rx, ry, soft=1.0, yy=_YY, xx=_XX):
    """Soft coverage [128,128] of an ellipse (or [h,w] over the window whose pixel grid is yy, xx)."""
    d = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    return np.clip((1 - d) * min(rx, ry) / soft + 0.5, 0, 1)


def _paint(img, alpha, color):
    """Composite color over img [h,w,3] with coverage alpha [h,w], in place.

    Channel by channel (numpy's inner loop over 3 channels is slow) and nothing where nothing is covered:
    the same float32 arithmetic, so the same pixels, about twice as fast.
    """
    if not alpha.any():
        return
    keep = 1 - alpha
    for c in range(3):
        ch = img[..., c]
        ch *= keep
        ch += alpha * color[c]


def draw(idn: Identity, openness=0.0, rounding=0.0, blink=0.0, dx=0.0, dy=0.0, window=None):
    """One frame -> (rgb uint8 [128,128,3], person_mask bool, face_mask bool).

    window=(r0, r1, c0, c1) draws only those rows and columns, bit-identical to that slice of the full
    frame: analysis by synthesis (engine/picture.py) renders many candidates of a small region.
    """
    r0, r1, c0, c1 = window if window is not None else (0, SIZE, 0, SIZE)
    yy, xx = _YY[r0:r1, c0:c1], _XX[r0:r1, c0:c1]  # [h, w] pixel grid of the window
    ell = partial(_ellipse, yy=yy, xx=xx)
    img = idn.background[r0:r1, c0:c1].copy()
    cx, cy, rx, ry = idn.face_cx + dx, idn.face_cy + dy, idn.face_rx, idn.face_ry
    person = np.zeros(yy.shape, np.float32)
    layers = []
    if idn.hair_style == 1:  # long hair behind the head and shoulders
        layers.append((np.maximum(ell(cx, cy + 8, rx + 7, ry + 10),
                                  ell(cx, cy + 34, rx + 9, 22) * (yy > cy).astype(np.float32)), idn.hair))
    # shoulders and clothing (static), neck follows the head a little
    body = ell(64, 128 + 6, idn.shoulder, 36)
    layers.append((body, idn.cloth))
    collar = ell(64, 128 - 2, 12, 20) * body
    layers.append((collar * 0.8, idn.cloth2))
    neck = np.clip(np.minimum(8.5 + dx * 0 - np.abs(xx - (64 + 0.5 * dx)), 3 * (yy - cy)) + 0.5, 0, 1)
    neck *= (yy < 112).astype(np.float32)
    layers.append((neck, idn.skin * 0.85))
    face = ell(cx, cy, rx, ry)
    layers.append((ell(cx - rx, cy + 2, 3.5, 6), idn.skin * 0.92))  # ears
    layers.append((ell(cx + rx, cy + 2, 3.5, 6), idn.skin * 0.92))
    layers.append((face, idn.skin))
    for a, col in layers:
        _paint(img, a, col)
        person = np.maximum(person, a)
    # hair on top
    top = ell(cx, cy - ry * 0.45, rx + 3, ry * 0.72)
    if idn.hair_style == 3:
        top = ell(cx, cy - ry * 0.62, rx + 1, ry * 0.5)
    cut = np.clip((cy - ry * 0.35 - yy) / 2 + 0.5, 0, 1)  # forehead line
    hair = top * np.maximum(cut, ((np.abs(xx - cx) > rx * 0.82) & (yy < cy)).astype(np.float32))
    if idn.hair_style == 2:
        hair = np.maximum(hair, ell(cx, cy - ry - 5, 9, 7))
    _paint(img, hair, idn.hair)
    person = np.maximum(person, hair)
    # eyes, lids (blink), brows
    eo = 1 - np.clip(blink, 0, 1)
    for s in (-1, 1):
        ex, ey = cx + s * idn.eye_dx, cy - idn.eye_dy
        white = ell(ex, ey, idn.eye_r * 1.5, max(idn.eye_r * eo, 0.01), soft=0.7) * (eo > 0.05)
        _paint(img, white, np.array([245, 245, 240], np.float32))
        _paint(img, white * ell(ex, ey, idn.eye_r * 0.8, idn.eye_r * 0.8, soft=0.7), idn.eye)
        _paint(img, white * ell(ex, ey, idn.eye_r * 0.35, idn.eye_r * 0.35, soft=0.7), np.zeros(3, np.float32))
        lid_line = ell(ex, ey, idn.eye_r * 1.6, 1.0, soft=0.7) * (1 - eo)
        _paint(img, lid_line, idn.skin * 0.55)
        brow = ell(ex, ey - idn.eye_r * 1.6 - 2, idn.eye_r * 1.7, 1.3, soft=0.7)
        _paint(img, brow, idn.hair * 0.8)
    # nose
    _paint(img, ell(cx, cy + 6, 2.5, 1.6) * 0.6, idn.skin * 0.7)
    # mouth: lips ellipse with a dark opening whose height follows openness, narrower when rounded
    mx, my = cx, cy + idn.mouth_dy
    w = idn.mouth_w * (1 - 0.35 * rounding) + 1.0 * openness
    h_open = 0.5 + 8.0 * openness
    lips = ell(mx, my, w + 2.0, h_open / 2 + 2.2)
    _paint(img, lips, idn.lip)
    inner = ell(mx, my, w, max(h_open / 2, 0.35), soft=0.6)
    _paint(img, inner, np.array([60, 20, 25], np.float32))
    if openness > 0.25:  # upper teeth
        teeth = inner * np.clip((my - h_open / 2 + 1.0 + 1.5 * openness - yy) + 0.5, 0, 1)
        _paint(img, teeth * 0.9, np.array([235, 230, 220], np.float32))
    face_mask = ell(cx, cy + 4, rx + 2, ry + 2) > 0.5
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), person > 0.5, face_mask


def reference(ident: int):
    """The reference portrait of an identity: mouth closed, eyes open, head centred."""
    return draw(identity(int(ident)))
