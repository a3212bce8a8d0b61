"""Frame autoencoder: 128x128 RGB <-> 16x8x8 latent, decoder conditioned on the reference portrait.

The decoder sees multi-scale features of the avatar's reference portrait (computed once per avatar),
so the latent only has to carry what changes from frame to frame (pose, mouth, eyes) and the static
identity and background are restored at full detail.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class AEConfig:
    image_size: int = 128
    latent_channels: int = 16
    widths: tuple = (16, 32, 64, 128, 128)  # at 128, 64, 32, 16, 8 px
    # the decoder's own widths at the same scales (None: `widths`); the reference features it fuses keep the
    # encoders' widths. Narrower is a cheaper decoder for slow CPUs (a second decoder file: [[live.levels]] decoder)
    decoder_widths: tuple | None = None
    flow: bool = False  # decoder warps the reference by a predicted flow (RefDecoder)
    fine: int = 0  # width of the decoder's 128-px refinement stage (0: none; needs flow)
    # rows r0:r1, columns c0:c1 the refinement stage covers (None: the whole frame). An aligned portrait
    # has its eyes and mouth in the middle; a window there costs a third of the whole frame
    fine_window: tuple | None = None
    image_warp: str = "bilinear"  # how the flow resamples the reference image: bilinear | bicubic (sharper lines)
    fine_blocks: int = 0  # residual blocks after that stage's first (each the identity when added: zero last conv)


TAPER = 6.0  # px over which the windowed refinement fades in from the window's edge


def _norm(c):
    return nn.GroupNorm(8, c)


class FineBlock(nn.Module):
    """x + conv(SiLU(GroupNorm(conv(x)))), the last conv zero at init: added to a trained decoder it changes
    nothing until it is trained."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.norm = _norm(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x):
        return x + self.conv2(F.silu(self.norm(self.conv1(x))))


class ResBlock(nn.Module):
    """Two 3x3 convs with GroupNorm/SiLU and a skip."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm1 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = F.silu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.silu(h + self.skip(x))

    def forward_up(self, low, rest):
        """self(cat([nearest 2x upsample of low, rest])) without building the upsampled map: the convs' part
        that reads `low` runs at its resolution (up_conv3x3; the 1x1 skip before the upsampling)."""
        c = low.shape[1]
        w = self.conv1.weight
        h = up_conv3x3(low, w[:, :c]) + F.conv2d(rest, w[:, c:], self.conv1.bias, padding=1)
        h = self.norm2(self.conv2(F.silu(self.norm1(h))))
        if isinstance(self.skip, nn.Identity):
            skip = torch.cat([F.interpolate(low, scale_factor=2, mode="nearest"), rest], 1)
        else:
            sw = self.skip.weight
            skip = F.interpolate(F.conv2d(low, sw[:, :c]), scale_factor=2, mode="nearest") + \
                F.conv2d(rest, sw[:, c:], self.skip.bias)
        return F.silu(h + skip)


def _pair_taps(k, dim):
    """3x3 taps along dim -> the 2 taps each output parity of a nearest 2x upsample reads: [(even), (odd)]."""
    a, b, c = k.unbind(dim)
    return torch.stack([a, b + c], dim), torch.stack([a + b, c], dim)


def up_conv3x3(x, weight):
    """conv2d(nearest 2x upsample of x, weight [Co, Ci, 3, 3], padding=1), computed at x's resolution.

    Output pixel (2i + a, 2j + b) of a 3x3 conv over the upsampled map reads only 2x2 distinct pixels of x
    (rows i - 1, i for a = 0 and i, i + 1 for a = 1; columns likewise), so each of the four parities is a
    2x2 conv of x whose taps are the 3x3 taps summed that land on the same pixel: 16 taps per pixel of x
    instead of 36, and no upsampled copy. Equal to the plain form up to float rounding (tested).
    """
    co, (n, _, hh, ww) = weight.shape[0], x.shape
    kernels = [kb for ka in _pair_taps(weight, 2) for kb in _pair_taps(ka, 3)]  # parities (0,0) (0,1) (1,0) (1,1)
    out = F.conv2d(F.pad(x, (1, 1, 1, 1)), torch.cat(kernels))  # [N, 4 Co, H + 1, W + 1]
    parts = [out[:, k * co:(k + 1) * co, a:a + hh, b:b + ww] for k, (a, b) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)])]
    # [N, Co, a, b, H, W] -> [N, Co, H, a, W, b] -> [N, Co, 2H, 2W]
    return torch.stack(parts, 2).view(n, co, 2, 2, hh, ww).permute(0, 1, 4, 2, 5, 3).reshape(n, co, 2 * hh, 2 * ww)


class Encoder(nn.Module):
    """Image [B,3,128,128] in [-1,1] -> latent [B,C,8,8]."""

    def __init__(self, cfg: AEConfig, out_channels=None):
        super().__init__()
        w = cfg.widths
        self.stem = nn.Conv2d(3, w[0], 3, padding=1)
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(w[i], w[i + 1], 3, stride=2, padding=1), ResBlock(w[i + 1], w[i + 1]))
            for i in range(len(w) - 1)
        )
        self.out = nn.Conv2d(w[-1], out_channels or cfg.latent_channels, 1)

    def features(self, x):
        """Feature maps at every scale, finest first: [128, 64, 32, 16, 8] px."""
        h = F.silu(self.stem(x))
        feats = [h]
        for block in self.down:
            h = block(h)
            feats.append(h)
        return feats

    def forward(self, x):
        return self.out(self.features(x)[-1])


def warp(x, flow, window=None, mode="bilinear"):
    """Sample x [B,C,H,W] at grid + flow; flow [B,2,H,W] in normalised coordinates ([-1, 1] spans the image).

    window=(r0, r1, c0, c1): flow covers only those rows and columns of the grid, and so does the output.
    """
    b, _, h, w = x.shape
    r0, r1, c0, c1 = window or (0, h, 0, w)
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=x.device, dtype=x.dtype)[r0:r1]
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=x.device, dtype=x.dtype)[c0:c1]
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)  # [h, w, 2] as (x, y)
    grid = grid + flow.permute(0, 2, 3, 1).to(x.dtype)
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)


def _resize(flow, size):
    """Flow [B,2,h,w] -> [B,2,size,size] (normalised units need no rescaling)."""
    return F.interpolate(flow, size=(size, size), mode="bilinear", align_corners=False)


class RefDecoder(nn.Module):
    """Latent [B,C,8,8] + reference features -> image [B,3,128,128].

    Works up to 64 px, fusing reference features at every scale, then a pixel-shuffle head predicts at
    128 px the change from the reference portrait. With `flow` (the default) the decoder also predicts,
    coarse to fine, where each pixel of the reference comes from: the reference features are warped by
    that flow before they are fused, and the output is warp(reference) + delta. A head that sways is
    then the reference moved, not a second head painted over the first (a `reference + delta` decoder
    cannot move pixels and draws doubled eyes under motion). The flow heads start at zero, so a decoder
    trained without flow loads into this one and starts exactly where it was. With `fine`, a last stage at
    128 px sees the finest reference features warped by that flow and corrects flow and delta there (thin
    lids, lip lines and teeth lost at 64 px); it also starts at zero. With `fine_window` that stage runs on
    a window only (the eyes and mouth of an aligned portrait), its corrections tapered to zero at the
    window's edge so that no seam shows; `fine_blocks` deepen it (each starts as the identity).
    (A learned alpha blend with the reference was tried first: its sigmoid saturated at "copy the
    reference" and no gradient reached the latent any more.)
    """

    def __init__(self, cfg: AEConfig):
        super().__init__()
        w, d = cfg.widths, cfg.decoder_widths or cfg.widths  # reference features' widths, the decoder's own
        if len(d) != len(w):
            raise ValueError(f"decoder_widths {d}: one width per scale of widths {w}")
        self.use_flow = cfg.flow
        if cfg.image_warp not in ("bilinear", "bicubic"):
            raise ValueError(f"image_warp {cfg.image_warp!r}: bilinear or bicubic")
        self.image_warp = cfg.image_warp
        if cfg.fine_blocks and not cfg.fine:
            raise ValueError(f"fine_blocks {cfg.fine_blocks} deepen the 128-px stage: set fine (its width) too")
        self.inp = nn.Conv2d(cfg.latent_channels + w[-1], d[-1], 3, padding=1)
        self.mid = ResBlock(d[-1], d[-1])
        # up i: from the scale of d[i+1] to the scale of d[i] (16, 32, 64 px), fused with reference features
        self.up = nn.ModuleList(ResBlock(d[i + 1] + w[i], d[i]) for i in reversed(range(1, len(w) - 1)))
        self.head = nn.Conv2d(d[1], 3 * 4, 3, padding=1)  # RGB delta x 2x2 sub-pixels
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if self.use_flow:
            # flow refinements at 8 px (before the first fusion) and after each up block (16, 32, 64 px)
            self.flow = nn.ModuleList(nn.Conv2d(c, 2, 3, padding=1) for c in [d[-1]] + [d[i] for i in
                                                                                     reversed(range(1, len(d) - 1))])
            for conv in self.flow:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
        self.fine = None
        if cfg.fine:
            # at 128 px: the upsampled features, the warped finest reference features and reference image,
            # and the coarse delta -> a flow correction and a delta correction (zero at init)
            self.fine = ResBlock(d[1] + w[0] + 3 + 3, cfg.fine)
            self.fine_blocks = nn.ModuleList(FineBlock(cfg.fine) for _ in range(cfg.fine_blocks))
            self.fine_out = nn.Conv2d(cfg.fine, 2 + 3, 3, padding=1)
            nn.init.zeros_(self.fine_out.weight)
            nn.init.zeros_(self.fine_out.bias)
            size = cfg.image_size
            self.fine_window = r0, r1, c0, c1 = tuple(cfg.fine_window or (0, size, 0, size))
            if not (0 <= r0 < r1 <= size and 0 <= c0 < c1 <= size and all(v % 2 == 0 for v in self.fine_window)):
                raise ValueError(f"fine_window {self.fine_window}: even bounds inside the {size}-px frame")
            # the whole frame needs no taper (no edge inside the frame); a window fades in from its edge
            ramp = lambda n: torch.clamp(torch.minimum(torch.arange(n) + 0.5, n - 0.5 - torch.arange(n)) / TAPER, 0, 1)
            taper = (torch.ones(r1 - r0, c1 - c0) if cfg.fine_window is None
                     else ramp(r1 - r0)[:, None] * ramp(c1 - c0)[None, :])
            self.register_buffer("fine_taper", taper, persistent=False)

    def forward(self, z, ref_feats, ref_image):
        """ref_feats: Encoder.features of the reference; ref_image [1,3,128,128] in [-1,1]."""
        b = z.shape[0]
        ref_feats = [rf.expand(b, -1, -1, -1) if rf.shape[0] != b else rf for rf in ref_feats]
        ref_image = ref_image.expand(b, -1, -1, -1) if ref_image.shape[0] != b else ref_image
        h = self.mid(F.silu(self.inp(torch.cat([z, ref_feats[-1]], 1))))
        flow = self.flow[0](h) if self.use_flow else None  # [B, 2, 8, 8]
        for k, (block, rf) in enumerate(zip(self.up, reversed(ref_feats[1:-1]))):
            if self.use_flow:
                flow = _resize(flow, 2 * h.shape[-1])
                rf = warp(rf, flow)
            h = block.forward_up(h, rf)  # = block(cat([nearest 2x upsample of h, rf]))
            if self.use_flow:
                flow = flow + self.flow[k + 1](h)
        delta = F.pixel_shuffle(self.head(h), 2)  # [B, 3, 128, 128]
        if not self.use_flow:
            return ref_image + delta
        flow = _resize(flow, ref_image.shape[-1])
        if self.fine is None:
            return warp(ref_image, flow, mode=self.image_warp) + delta
        r0, r1, c0, c1 = win = self.fine_window
        f, d = flow[..., r0:r1, c0:c1], delta[..., r0:r1, c0:c1]
        g = self.fine.forward_up(h[..., r0 // 2:r1 // 2, c0 // 2:c1 // 2],  # 2x upsampled, like the rest
                                 torch.cat([warp(ref_feats[0], f, win), warp(ref_image, f, win, self.image_warp), d], 1))
        for block in self.fine_blocks:
            g = block(g)
        correction = self.fine_out(g) * self.fine_taper.to(g.dtype)
        inner = warp(ref_image, f + correction[:, :2], win, self.image_warp) + d + correction[:, 2:]
        if inner.shape[-2:] == delta.shape[-2:]:
            return inner  # the window is the whole frame
        out = warp(ref_image, flow, mode=self.image_warp) + delta
        out[..., r0:r1, c0:c1] = inner
        return out


class FrameAutoencoder(nn.Module):
    """Encoder + reference encoder + reference-conditioned decoder; latents are standardised."""

    def __init__(self, cfg: AEConfig = AEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.ref_encoder = Encoder(cfg)
        self.decoder = RefDecoder(cfg)
        # per-channel statistics of encoder outputs, set after training: latent = (raw - mean) / std
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))

    @staticmethod
    def to_input(frames_u8):
        """uint8 [...,H,W,3] (numpy or tensor) -> float [...,3,H,W] in [-1,1]."""
        x = torch.as_tensor(frames_u8)
        return x.movedim(-1, -3).float().div(127.5).sub(1.0)

    @staticmethod
    def to_uint8(x):
        """float [...,3,H,W] in [-1,1] -> uint8 numpy [...,H,W,3]."""
        return x.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).movedim(-3, -1).numpy()

    def encode(self, x):
        """[B,3,H,W] -> standardised latent [B,C,8,8]."""
        z = self.encoder(x)
        return (z - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]

    def reference(self, ref):
        """Reference portrait [1,3,H,W] -> what the decoder needs of it (compute once per avatar)."""
        return self.ref_encoder.features(ref), ref

    def decode(self, z, ref_feats):
        """Standardised latent [B,C,8,8] -> image [B,3,H,W]."""
        raw = z * self.latent_std[:, None, None] + self.latent_mean[:, None, None]
        feats, image = ref_feats
        return self.decoder(raw, feats, image)
