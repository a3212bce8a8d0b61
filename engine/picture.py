"""Picture fidelity by analysis by synthesis: how far a frame is from a clean render of its portrait.

Every clean frame of our synthetic world is `portraits.draw(identity, openness, rounding, blink, dx, dy)`.
`fit_frame` finds the five parameters whose render comes closest to a frame over the face, and
`face_psnr` is the PSNR against that render: noise, blur or a doubled eye cost decibels, while a
different (but clean) mouth shape, blink or head offset costs nothing. The fit stops once a render
matches to 58 dB, so true frames score about 60 dB; through H.264 (crf 18, 4:2:0) about 34.

Face region (where the fit is measured and the PSNR taken): the ellipse portraits.draw returns as
face_mask (centre 4 px below the face centre, radii face_rx + 2 and face_ry + 2) grown by REGION_GROW
px, at the fitted head offset: forehead to chin and cheek to cheek, with eyes, brows, nose, mouth and
the outline of the face against hair, ears and background.

The fit (about 40 ms a frame on one core, starting from the previous frame's): a whole-px head shift from
the face outside mouth and eyes, coarse grids for openness and blink (their costs jump where teeth show
and eye whites vanish), then Gauss-Newton on all five with finite differences of renders. Each step
renders only the window its parameters can change (`portraits.draw(window=...)`).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from engine.data import portraits

SIZE = portraits.SIZE
PARAMS = ("openness", "rounding", "blink", "dx", "dy")
START = {"openness": 0.2, "rounding": 0.3, "blink": 0.0, "dx": 0.0, "dy": 0.0}  # the fit's start without init
BOUNDS = {"openness": (0.0, 1.0), "rounding": (0.0, 1.0), "blink": (0.0, 1.0), "dx": (-8.0, 8.0), "dy": (-8.0, 8.0)}
REGION_GROW = 3.0  # px the face ellipse is grown by (see the module docstring)
SLACK = 2  # px of margin around each window
SHIFT_REACH = 3  # px the head may be from the start (sway stays within 2 px of the reference pose)
# coarse candidates where the cost is bumpy: teeth show above openness 0.25, eye whites vanish near blink 1
OPENNESS_GRID, OPENNESS_GRID_FINE = np.array([0.0, 0.2, 0.3, 0.5, 0.75, 1.0]), np.array([-0.1, 0.1])
BLINK_GRID = np.linspace(0, 1, 5)
FD_STEP = {"openness": 0.03, "rounding": 0.05, "blink": 0.03, "dx": 0.1, "dy": 0.1}  # finite differences
# Gauss-Newton: most steps; least relative gain of a step to go on, and to reuse the Jacobian; MSE that is exact
GN_ITERS, GN_MIN_GAIN, GN_KEEP_GAIN, GN_DONE_MSE = 10, 0.05, 0.5, 0.1  # (gain 0.05: 0.2 dB; MSE 0.1: 58 dB)
# crop boxes when no identity is given: mid-range geometry, and margins that cover every identity's range
TYPICAL = SimpleNamespace(face_cx=64.0, face_cy=54.5, eye_dx=10.5, eye_dy=7.0, eye_r=3.6, mouth_w=8.5, mouth_dy=16.5)
ANY_IDENTITY_MARGIN = 8  # px: TYPICAL's boxes grown by this hold every identity's eyes and mouth at any sway


# ------------------------------------------------------------------------------------ geometry
def _window(cx, cy, half_w, half_h):
    """Rows/cols (r0, r1, c0, c1) covering the box centred on (cx, cy), clipped to the frame."""
    r0, r1 = np.floor(cy - half_h) - SLACK, np.ceil(cy + half_h) + SLACK + 1
    c0, c1 = np.floor(cx - half_w) - SLACK, np.ceil(cx + half_w) + SLACK + 1
    return tuple(int(np.clip(v, 0, SIZE)) for v in (r0, r1, c0, c1))


def face_window(idn, dx, dy):
    """The bounding window of the face region at head offset (dx, dy)."""
    grow = 2 + REGION_GROW
    return _window(idn.face_cx + dx, idn.face_cy + dy + 4, idn.face_rx + grow, idn.face_ry + grow)


def mouth_window(idn, dx, dy):
    """Everything openness and rounding can change (lips at most mouth_w + 3 wide, 6.5 high)."""
    return _window(idn.face_cx + dx, idn.face_cy + dy + idn.mouth_dy, idn.mouth_w + 3.5, 7.0)


def eye_window(idn, dx, dy):
    """Everything blink can change: both eye whites and lid lines."""
    return _window(idn.face_cx + dx, idn.face_cy + dy - idn.eye_dy, idn.eye_dx + 1.6 * idn.eye_r + 0.5,
                   idn.eye_r + 0.5)


def face_region(idn, dx, dy, window=(0, SIZE, 0, SIZE)) -> np.ndarray:
    """bool [h, w] over window: the face ellipse grown by REGION_GROW px at head offset (dx, dy)."""
    r0, r1, c0, c1 = window
    yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float32)
    ax, ay = idn.face_rx + 2 + REGION_GROW, idn.face_ry + 2 + REGION_GROW
    return ((xx - idn.face_cx - dx) / ax) ** 2 + ((yy - idn.face_cy - dy - 4) / ay) ** 2 <= 1.0


def eye_box(idn, margin=4):
    """Crop (r0, r1, c0, c1) of both eyes with their brows, margin px around the head at rest."""
    ey = idn.face_cy - idn.eye_dy
    top = ey - 1.6 * idn.eye_r - 3.3  # brow top
    half_w = idn.eye_dx + 1.7 * idn.eye_r
    return _box(top - margin, ey + idn.eye_r + margin, idn.face_cx - half_w - margin, idn.face_cx + half_w + margin)


def mouth_box(idn, margin=4):
    """Crop (r0, r1, c0, c1) of the mouth at its widest and most open, margin px around the head at rest."""
    my, half_w = idn.face_cy + idn.mouth_dy, idn.mouth_w + 3.0
    return _box(my - 6.5 - margin, my + 6.5 + margin, idn.face_cx - half_w - margin, idn.face_cx + half_w + margin)


def _box(top, bottom, left, right):
    """Whole-px crop (r0, r1, c0, c1) covering [top, bottom] x [left, right], clipped to the frame."""
    r0, r1 = int(np.floor(top)), int(np.ceil(bottom)) + 1
    c0, c1 = int(np.floor(left)), int(np.ceil(right)) + 1
    return max(r0, 0), min(r1, SIZE), max(c0, 0), min(c1, SIZE)


# ------------------------------------------------------------------------------------- fitting
def as_identity(ident) -> portraits.Identity:
    """An Identity, or the identity an avatar id names ("3", "id3", 1000); ValueError if none."""
    if isinstance(ident, portraits.Identity):
        return ident
    return portraits.identity(portraits.identity_number(ident))


class _Frame:
    """One frame and the identity it is fitted with: candidate renders over windows of it."""

    def __init__(self, frame_u8, idn):
        self.target = np.asarray(frame_u8, np.float32)  # [128,128,3]
        self.idn = idn

    def render(self, p, window):
        """float32 [h, w, 3]: the clean render of parameters p over window."""
        rgb = portraits.draw(self.idn, p["openness"], p["rounding"], p["blink"], p["dx"], p["dy"], window=window)[0]
        return rgb.astype(np.float32)


class _Group:
    """Some parameters fitted over one window (and a mask in it): costs, coarse grids, Gauss-Newton steps.

    local: {key: sub-window} for keys that change only that part of the window (the mouth's, the eyes'),
    so their finite differences render only it.
    """

    def __init__(self, frame: _Frame, keys, window, mask=None, local=None):
        r0, r1, c0, c1 = window
        self.frame, self.keys, self.window, self.local = frame, keys, window, local or {}
        self.mask = np.ones((r1 - r0, c1 - c0), bool) if mask is None else mask  # [h, w]
        self.target = frame.target[r0:r1, c0:c1]  # [h, w, 3]

    def cost(self, p, render=None):
        """Mean squared error over the masked window."""
        render = self.frame.render(p, self.window) if render is None else render
        return float(np.mean((render - self.target)[self.mask] ** 2))

    def grid(self, p, key, values):
        """p with p[key] set to the best of values (the others held): a coarse look where the cost is bumpy."""
        values = np.unique(np.clip(values, *BOUNDS[key]))
        best = min(values, key=lambda v: self.cost(p | {key: float(v)}))
        return p | {key: float(best)}

    def coarse_shift(self, p, reach):
        """p with the head moved by the shift (up to reach px) that best aligns p's render with the frame
        outside the mouth and eyes (face outline, hair, brows, nose: what only the head offset moves).

        The render is shifted by whole px, not drawn again (49 shifts cost one render); a parabola through
        the costs around the best whole shift places it to a fraction of a px.
        """
        render = self.frame.render(p, self.window)
        h, w = self.mask.shape
        core = np.zeros_like(self.mask)
        core[reach:h - reach, reach:w - reach] = self.mask[reach:h - reach, reach:w - reach]
        R0, _, C0, _ = self.window
        for r0, r1, c0, c1 in set(self.local.values()):  # mouth and eyes may differ from p's: leave them out
            core[max(r0 - R0 - reach, 0):r1 - R0 + reach, max(c0 - C0 - reach, 0):c1 - C0 + reach] = False
        ys, xs = np.nonzero(core)
        ref = render[ys, xs]  # [n, 3]
        span = np.arange(-reach, reach + 1)
        cost = np.array([[np.mean((self.target[ys + sy, xs + sx] - ref) ** 2) for sx in span] for sy in span])
        iy, ix = np.unravel_index(np.argmin(cost), cost.shape)
        sy, sx = span[iy] + _vertex(cost[iy - 1:iy + 2, ix]), span[ix] + _vertex(cost[iy, ix - 1:ix + 2])
        return p | {"dx": float(np.clip(p["dx"] + sx, *BOUNDS["dx"])),
                    "dy": float(np.clip(p["dy"] + sy, *BOUNDS["dy"]))}

    def _moved(self, p, k, h, render):
        """The render over the window with p[k] moved by h (only the key's sub-window drawn again)."""
        q = p | {k: p[k] + h}
        if k not in self.local:
            return self.frame.render(q, self.window)
        R0, _, C0, _ = self.window
        r0, r1, c0, c1 = self.local[k]
        moved = render.copy()
        moved[r0 - R0:r1 - R0, c0 - C0:c1 - C0] = self.frame.render(q, self.local[k])
        return moved

    def _column(self, p, k, render):
        """d render / d p[k] over the masked window -> float32 [n * 3].

        Forward and backward differences, per pixel the smaller: a hard-edged part (the hair at the temples,
        the teeth, an eye white) that flips on one side of p would otherwise swamp the smooth slope.
        """
        lo, hi = BOUNDS[k]
        h = FD_STEP[k]
        fwd = (self._moved(p, k, h, render) - render) / h if p[k] + h <= hi else None
        bwd = (render - self._moved(p, k, -h, render)) / h if p[k] - h >= lo else None
        d = fwd if bwd is None else bwd if fwd is None else np.where(np.abs(fwd) < np.abs(bwd), fwd, bwd)
        return d[self.mask].reshape(-1)

    def gauss_newton(self, p, iters):
        """Up to iters Gauss-Newton steps on the group's keys -> (p, its render over the window [h, w, 3]).

        The Jacobian (finite differences of renders) is reused while its steps gain GN_KEEP_GAIN and taken
        again when they gain less; a step is kept only if it lowers the cost (else it is halved once), so the
        fit never gets worse. Stops when a step from a fresh Jacobian gains less than GN_MIN_GAIN, or when
        the render matches to GN_DONE_MSE.
        """
        render = self.frame.render(p, self.window)
        best, jac = self.cost(p, render), None
        for _ in range(iters):
            if best < GN_DONE_MSE:
                break
            fresh = jac is None
            if fresh:
                jac = np.stack([self._column(p, k, render) for k in self.keys], 1)  # [3n, K]
            res = (render - self.target)[self.mask].reshape(-1)  # [3n]
            delta = np.linalg.lstsq(jac, -res, rcond=None)[0]
            gain = 0.0
            for scale in (1.0, 0.5):
                q = p | {k: float(np.clip(p[k] + scale * d, *BOUNDS[k])) for k, d in zip(self.keys, delta)}
                q_render = self.frame.render(q, self.window)
                c = self.cost(q, q_render)
                if c < best:
                    p, render, best, gain = q, q_render, c, 1 - c / best
                    break
            if fresh and gain < GN_MIN_GAIN:
                break
            if gain < GN_KEEP_GAIN:
                jac = None
        return p, render


def _vertex(c3) -> float:
    """Offset in (-0.5, 0.5) of the minimum of the parabola through three costs at -1, 0, 1 (0 if none)."""
    if len(c3) != 3:
        return 0.0
    curv = c3[0] - 2 * c3[1] + c3[2]
    return float(np.clip((c3[0] - c3[2]) / (2 * curv), -0.5, 0.5)) if curv > 0 else 0.0


def _inside(sub, window):
    """sub-window clipped to window."""
    return (max(sub[0], window[0]), min(sub[1], window[1]), max(sub[2], window[2]), min(sub[3], window[3]))


def _whole(frame, p, keys=PARAMS):
    """keys fitted over the face region at p's head offset (mouth and blink renders only their windows)."""
    idn, dx, dy = frame.idn, p["dx"], p["dy"]
    win = face_window(idn, dx, dy)
    mouth, eyes = _inside(mouth_window(idn, dx, dy), win), _inside(eye_window(idn, dx, dy), win)
    local = {"openness": mouth, "rounding": mouth, "blink": eyes}
    return _Group(frame, keys, win, face_region(idn, dx, dy, win), local)


def _fit(frame: _Frame, init=None):
    """The five parameters of the clean render closest to the frame (warm start: init)
    -> (params, window, the render over it float32 [h, w, 3])."""
    idn = frame.idn
    p = {k: float(np.clip((init or START)[k], *BOUNDS[k])) for k in PARAMS}
    p = _whole(frame, p).coarse_shift(p, SHIFT_REACH)  # whole px first: Gauss-Newton sees about one px
    # coarse mouth and blink on their own windows, then all five together
    mouth = _Group(frame, (), mouth_window(idn, p["dx"], p["dy"]))
    p = mouth.grid(p, "openness", OPENNESS_GRID)
    p = mouth.grid(p, "openness", p["openness"] + OPENNESS_GRID_FINE)
    p = _Group(frame, (), eye_window(idn, p["dx"], p["dy"])).grid(p, "blink", BLINK_GRID)
    whole = _whole(frame, p)
    return *whole.gauss_newton(p, GN_ITERS), whole.window


def fit_frame(frame_u8, idn, init=None):
    """Frame uint8 [128,128,3] -> (params {openness, rounding, blink, dx, dy}, render uint8 [128,128,3],
    face region bool [128,128]) of the clean render of idn closest to the frame over the face.

    init: where the search starts, e.g. the previous frame's params (default START: the head at rest).
    """
    idn = as_identity(idn)
    p, _, _ = _fit(_Frame(frame_u8, idn), init)
    render = portraits.draw(idn, *(p[k] for k in PARAMS))[0]
    return p, render, face_region(idn, p["dx"], p["dy"])


def psnr(a, b) -> float:
    """PSNR in dB between two equal arrays of uint8 pixel values (frame stacks: over all pixels); 100 when
    identical."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 100.0 if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def _frame_psnr(frame_u8, idn, init=None):
    """(face PSNR, params) of one frame, rendering only the face window."""
    frame = _Frame(frame_u8, idn)
    p, render, win = _fit(frame, init)
    fitted = face_window(idn, p["dx"], p["dy"])
    if _inside(fitted, win) != fitted:  # the head moved out of the window the fit rendered
        win, render = fitted, frame.render(p, fitted)
    r0, r1, c0, c1 = win
    region = face_region(idn, p["dx"], p["dy"], win)
    return psnr(render[region], frame.target[r0:r1, c0:c1][region]), p


def face_psnr(frames_u8, ident, stride=1) -> dict:
    """Face-region PSNR (see the module docstring) of frames uint8 [T,128,128,3] against their closest clean
    renders of identity ident (number or Identity); every stride-th frame, each fit warm-started from the last.

    -> {"frames": indices, "psnr": per-frame dB, "median", "mean", "min", "params": per-frame fits}
    """
    frames = np.asarray(frames_u8)
    if frames.ndim != 4 or frames.shape[1:] != (SIZE, SIZE, 3):
        raise ValueError(f"face_psnr needs frames [T,{SIZE},{SIZE},3], got {list(frames.shape)}")
    idn = as_identity(ident)
    idx = list(range(0, len(frames), max(1, int(stride))))
    values, params, p = [], [], None
    for i in idx:
        v, p = _frame_psnr(frames[i], idn, p)
        values.append(v)
        params.append(p)
    v = np.array(values or [np.nan], np.float64)
    return {"frames": idx, "psnr": values, "median": float(np.median(v)), "mean": float(v.mean()),
            "min": float(v.min()), "params": params}


def drift_db(frames_u8, ident, fps=25, window_s=10, stride=1) -> float:
    """Mean face_psnr over the last window_s seconds minus the first (negative: the picture degrades).

    On a video shorter than two windows each window is half of it.
    """
    n = max(1, min(int(round(window_s * fps)), len(frames_u8) // 2))
    first = face_psnr(frames_u8[:n], ident, stride)["mean"]
    last = face_psnr(frames_u8[-n:], ident, stride)["mean"]
    return float(last - first)


def video_face_psnr(path, ident, stride=1) -> dict:
    """face_psnr of a video file -> {"face_psnr": median over its frames, "face_psnr_min"}."""
    from engine.media import read_mp4
    frames, _, _ = read_mp4(path)
    res = face_psnr(frames, ident, stride)
    return {"face_psnr": res["median"], "face_psnr_min": res["min"]}


# ------------------------------------------------------------------------------------- looking
def sheet_frames(n_frames, fps=25, per_second=4) -> list[tuple[str, list[int]]]:
    """Which frames a crops sheet shows: per_second of the first, the middle and the last second."""
    n = max(1, int(round(fps)))
    starts = (("first", 0), ("middle", max(0, (n_frames - n) // 2)), ("last", max(0, n_frames - n)))
    return [(name, sorted({min(s + int(round(k * n / per_second)), n_frames - 1) for k in range(per_second)}))
            for name, s in starts]


def crops_sheet(frames_u8, ident, path, fps=25, per_second=4, scale=3, title=None) -> dict:
    """PNG of eye and mouth crops (nearest-neighbour x scale) from the first, middle and last second of a
    render, each labelled with its time (and face PSNR when the identity is known): what a doubled eye or a
    blurred mouth looks like, and whether it creeps in over a long render.

    ident: number or Identity (crop boxes from its geometry), or None (boxes wide enough for any identity).
    -> {"path", "frames": the indices shown}
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    frames = np.asarray(frames_u8)
    idn = as_identity(ident) if ident is not None else None
    margin = 4 if idn is not None else ANY_IDENTITY_MARGIN
    eyes, mouth = eye_box(idn or TYPICAL, margin), mouth_box(idn or TYPICAL, margin)
    shown = [(name, i) for name, idx in sheet_frames(len(frames), fps, per_second) for i in idx]
    fits = {}
    if idn is not None:
        fits = {i: _frame_psnr(frames[i], idn)[0] for _, i in shown}
    up = lambda img: img.repeat(scale, 0).repeat(scale, 1)  # noqa: E731
    crop = lambda f, b: up(f[b[0]:b[1], b[2]:b[3]])  # noqa: E731
    heights = [eyes[1] - eyes[0], mouth[1] - mouth[0]]
    col_w = max(eyes[3] - eyes[2], mouth[3] - mouth[2]) * scale / 100
    fig, axes = plt.subplots(2, len(shown), figsize=(len(shown) * (col_w + 0.1), sum(heights) * scale / 100 + 1.0),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for col, (name, i) in enumerate(shown):
        for row, box in enumerate((eyes, mouth)):
            ax = axes[row, col]
            ax.imshow(crop(frames[i], box), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        label = f"{name}\n{i / fps:.2f} s" + (f"\n{fits[i]:.1f} dB" if i in fits else "")
        axes[0, col].set_title(label, fontsize=7)
    axes[0, 0].set_ylabel("eyes", fontsize=8)
    axes[1, 0].set_ylabel("mouth", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9, y=1.08)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return {"path": str(path), "frames": [i for _, i in shown]}
