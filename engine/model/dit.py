"""Audio-driven Diffusion Transformer over the latent patches of one chunk of frames.

Reads like facebookresearch/DiT models.py: heavy blocks are adaLN-Zero self-attention + MLP over all
tokens [reference | motion | chunk]; lightweight audio cross-attention blocks run after a subset of the
heavy blocks on the chunk tokens only, each video frame attending to the audio tokens around its own
time, their output scaled by a face mask (as HunyuanVideo-Avatar's audio adapters are).
"""
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DiTConfig:
    latent_channels: int = 16
    latent_size: int = 8
    patch: int = 2
    hidden: int = 256
    depth: int = 12
    heads: int = 4
    mlp_ratio: float = 4.0
    frames: int = 4  # video frames per chunk (W)
    motion_frames: int = 2  # last latent frames of the previous chunk
    audio_dim: int = 128
    audio_inner: int = 128
    audio_heads: int = 2
    audio_after: tuple = (1, 3, 5, 7, 9, 11)  # heavy block indices followed by an audio block
    lookback: int = 4  # audio context before the chunk, in video frames
    lookahead: int = 2  # audio context after the chunk, in video frames
    attend: tuple = (-3, 2)  # frame f attends to audio of frames [f-3, f+2]

    @property
    def tokens_per_frame(self):
        return (self.latent_size // self.patch) ** 2

    @property
    def audio_frames(self):
        return self.lookback + self.frames + self.lookahead


PRESETS = {
    "ref-S": DiTConfig(),
    "ref-XS": DiTConfig(hidden=192, depth=8, audio_after=(1, 3, 5, 7)),
}

# Output weight of a chunk (ChunkCondition.output_weight), by which SyncCache's calibration weighs the
# error of a reuse (a relative L1 of the velocity): background 1, face FACE_WEIGHT, mouth MOUTH_WEIGHT.
# On the 27 reference portraits (8x8 latent grid per frame) the face covers 10.5 of 64 cells and the mouth
# region 3.3 (5% of the frame): with 4 and 16, the mouth carries 39% of the total weight, the rest of the
# face 22% and the background 40%. The mouth, where lip sync is seen, then counts as much as the whole
# background, while a reuse that only blurs the background still pays (2 and 8 would leave the mouth 28%,
# 4 and 32 would cut the background, where caching errors show as drift and flicker, to 29%).
FACE_WEIGHT, MOUTH_WEIGHT = 4.0, 16.0
MOUTH_ROWS = (0.5, 0.9)  # mouth region rows, as fractions of the face mask's height (top to bottom)
MOUTH_HALF_WIDTH = 0.3  # and columns within this fraction of its width either side of its centre
OUTPUT_WEIGHT_NAME = f"face{FACE_WEIGHT:g}_mouth{MOUTH_WEIGHT:g}"


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def mouth_region(face_mask):
    """Face mask [B, H, W] (in [0, 1]) -> bool [B, H, W]: the mouth region, derived from the mask alone.

    The face mask's pixels (> 0.5) in rows between MOUTH_ROWS = 50% and 90% of the mask's bounding-box
    height, counted from its top, and in columns within MOUTH_HALF_WIDTH = 30% of its width either side of
    its centre column (the middle 60%): the lower middle of the face. On the procedural portraits the mouth
    sits at 66-73% of the mask's height (engine/data/portraits.py) and this box holds 99.9% of the pixels a
    wide-open or rounded mouth changes, with the head swayed 2 px any way (at most 1.1% outside, on one
    portrait), at 31% of the face's area. An empty mask has no mouth.
    """
    m = face_mask > 0.5
    _, h, w = m.shape
    ri, ci = torch.arange(h, device=m.device), torch.arange(w, device=m.device)
    rows, cols = m.any(2), m.any(1)
    top, bottom = torch.where(rows, ri, h).amin(1), torch.where(rows, ri, -1).amax(1)
    left, right = torch.where(cols, ci, w).amin(1), torch.where(cols, ci, -1).amax(1)
    height = (bottom - top + 1).clamp_min(1).float()
    width = (right - left + 1).clamp_min(1).float()
    y = (ri[None] + 0.5 - top[:, None]) / height[:, None]  # [B, H] fraction of the face's height
    x = (ci[None] + 0.5 - (left + right + 1)[:, None] / 2) / width[:, None]  # [B, W] from the centre
    in_rows = (y >= MOUTH_ROWS[0]) & (y <= MOUTH_ROWS[1])
    return m & in_rows[:, :, None] & (x.abs() <= MOUTH_HALF_WIDTH)[:, None, :]


def sincos_2d(dim, size):
    """Fixed 2-D sine-cosine position embedding -> [size*size, dim]."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    ys, xs = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    emb = np.concatenate([one_d(dim // 2, ys.ravel()), one_d(dim // 2, xs.ravel())], axis=1)
    return torch.from_numpy(emb).float()


class TimestepEmbedder(nn.Module):
    """Flow time t in [0,1] -> vector [B, D]."""

    def __init__(self, hidden, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = (t.float() * 1000)[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1))


class Attention(nn.Module):
    """Multi-head self-attention."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class HeavyBlock(nn.Module):
    """Visual DiT block with adaLN-Zero conditioning on the timestep."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hid = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hid), nn.GELU(approximate="tanh"), nn.Linear(hid, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class AudioBlock(nn.Module):
    """Lightweight cross-attention from chunk tokens to audio tokens, scaled by a face mask."""

    def __init__(self, dim, audio_dim, inner, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.q = nn.Linear(dim, inner)
        self.kv = nn.Linear(audio_dim, 2 * inner)
        self.proj = nn.Linear(inner, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def project_audio(self, audio):
        """audio tokens [B, A, Da] -> (k, v) each [B, heads, A, hd]; independent of the denoising step."""
        b, a, _ = audio.shape
        k, v = self.kv(audio).view(b, a, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x, kv, bias, face_mask):
        """x [B, N, D] chunk tokens; bias [N, A] additive attention mask; face_mask [B, N, 1]."""
        b, n, _ = x.shape
        k, v = kv
        q = self.q(self.norm(x)).view(b, n, self.heads, -1).transpose(1, 2)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(h.transpose(1, 2).reshape(b, n, -1)) * face_mask


class FinalLayer(nn.Module):
    """adaLN + linear to patch velocities."""

    def __init__(self, dim, out_dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


@dataclass
class ChunkCondition:
    """Everything about a chunk that does not change across denoising steps (built once per chunk)."""
    context: torch.Tensor  # [B, R + M, D] embedded reference + motion tokens
    audio_kv: list  # per audio block: (k, v)
    audio_bias: torch.Tensor  # [N, A] additive mask
    face_mask: torch.Tensor  # [B, N, 1]
    human_weight: torch.Tensor  # [B, N] per-token weight emphasising the person (for probes)
    # [B, 1, 1, h, w] weight on the output's latent grid emphasising the face and most of all the mouth
    # (AvatarDiT.output_weight; SyncCache's calibration weighs reuse errors by it); None: uniform
    output_weight: torch.Tensor = None
    guided: bool = False  # the batch is [B with audio; B null audio] (prepare(null_audio=True)), for guidance
    extras: dict = field(default_factory=dict)


class AvatarDiT(nn.Module):
    """Audio-driven DiT: (noisy chunk latents, t, ChunkCondition) -> velocity."""

    def __init__(self, cfg: DiTConfig = DiTConfig()):
        super().__init__()
        self.cfg = cfg
        d, p, c = cfg.hidden, cfg.patch, cfg.latent_channels
        self.patch_dim = c * p * p
        self.x_embed = nn.Linear(self.patch_dim, d)
        self.cond_embed = nn.Linear(self.patch_dim, d)  # reference and motion latents (clean)
        self.t_embedder = TimestepEmbedder(d)
        self.register_buffer("pos_embed", sincos_2d(d, cfg.latent_size // p)[None], persistent=False)
        # one learned embedding per role/time: [reference, motion..., chunk frames...]
        self.frame_embed = nn.Parameter(torch.zeros(1 + cfg.motion_frames + cfg.frames, 1, d))
        self.blocks = nn.ModuleList(HeavyBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.audio_blocks = nn.ModuleList(
            AudioBlock(d, cfg.audio_dim, cfg.audio_inner, cfg.audio_heads) for _ in cfg.audio_after)
        self.audio_slot = {blk: i for i, blk in enumerate(cfg.audio_after)}
        self.final_layer = FinalLayer(d, self.patch_dim)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.weight.requires_grad:
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.frame_embed, std=0.02)
        for blk in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for blk in self.audio_blocks:
            nn.init.zeros_(blk.proj.weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # --- patches -------------------------------------------------------------------------------
    def patchify(self, z):
        """[B, F, C, H, W] -> [B, F * (H/p) * (W/p), C*p*p]."""
        b, f, c, h, w = z.shape
        p = self.cfg.patch
        z = z.reshape(b, f, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        return z.reshape(b, f * (h // p) * (w // p), c * p * p)

    def unpatchify(self, x, frames):
        """[B, F * (H/p) * (W/p), C*p*p] -> [B, F, C, H, W]."""
        b = x.shape[0]
        p, c, s = self.cfg.patch, self.cfg.latent_channels, self.cfg.latent_size
        g = s // p
        x = x.reshape(b, frames, g, g, c, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, frames, c, s, s)

    def _frame_tokens(self, emb, first_slot, frames):
        """Add spatial and per-frame embeddings to [B, frames * T, D] tokens."""
        b, _, d = emb.shape
        emb = emb.view(b, frames, -1, d) + self.pos_embed[:, None]
        emb = emb + self.frame_embed[first_slot:first_slot + frames].unsqueeze(0)
        return emb.reshape(b, -1, d)

    # --- per chunk ---------------------------------------------------------------------------------
    def audio_bias(self, device=None):
        """[N, A] additive mask: the tokens of frame f see audio of frames [f+a0, f+a1]."""
        cfg = self.cfg
        a0, a1 = cfg.attend
        f = torch.arange(cfg.frames).repeat_interleave(cfg.tokens_per_frame)  # [N] frame of token
        af = torch.arange(cfg.audio_frames).repeat_interleave(2) - cfg.lookback  # [A] frame of audio token
        ok = (af[None] >= f[:, None] + a0) & (af[None] <= f[:, None] + a1)
        return torch.zeros(ok.shape, device=device).masked_fill(~ok, float("-inf"))

    def token_mask(self, mask):
        """Pixel mask [B, H, W] in [0,1] -> per chunk token weight [B, N, 1] (soft, >0 near the mask)."""
        cfg = self.cfg
        g = cfg.latent_size // cfg.patch
        frac = F.adaptive_avg_pool2d(mask[:, None].float(), g).flatten(1)  # [B, g*g]
        tok = (frac * 4).clamp(0, 1)
        return tok.repeat(1, cfg.frames)[..., None]

    def output_weight(self, face_mask):
        """Face mask [B, 128, 128] -> [B, 1, 1, h, w] weight on the velocity's latent grid (broadcasts over
        frames and channels): 1 + (FACE_WEIGHT - 1) face + (MOUTH_WEIGHT - FACE_WEIGHT) mouth, where face and
        mouth are the fractions of each latent cell's pixels in the face mask and in its mouth_region. A
        cell wholly in the mouth weighs 16, wholly in the face 4, the background 1."""
        s = self.cfg.latent_size
        face = F.adaptive_avg_pool2d((face_mask > 0.5)[:, None].float(), s)
        mouth = F.adaptive_avg_pool2d(mouth_region(face_mask)[:, None].float(), s)
        return (1 + (FACE_WEIGHT - 1) * face + (MOUTH_WEIGHT - FACE_WEIGHT) * mouth)[:, None]

    def prepare(self, ref_latent, motion_latents, audio_tokens, face_mask, person_mask=None, null_audio=False):
        """Build the ChunkCondition.

        ref_latent [B, C, H, W]; motion_latents [B, M, C, H, W]; audio_tokens [B, A, Da];
        face_mask / person_mask [B, 128, 128] of the reference portrait.
        null_audio: also build each sample's twin with null audio (all-zero tokens, as audio dropout
        trains), for classifier-free guidance: the condition's batch is then [B with audio; B null].
        """
        if null_audio:
            audio_tokens = torch.cat([audio_tokens, torch.zeros_like(audio_tokens)])
            ref_latent, motion_latents = torch.cat([ref_latent] * 2), torch.cat([motion_latents] * 2)
            face_mask = torch.cat([face_mask] * 2)
            person_mask = None if person_mask is None else torch.cat([person_mask] * 2)
        ref = self._frame_tokens(self.cond_embed(self.patchify(ref_latent[:, None])), 0, 1)
        mot = self._frame_tokens(self.cond_embed(self.patchify(motion_latents)), 1, self.cfg.motion_frames)
        kv = [blk.project_audio(audio_tokens) for blk in self.audio_blocks]
        fm = self.token_mask(face_mask)
        human = self.token_mask(person_mask if person_mask is not None else face_mask)[..., 0]
        return ChunkCondition(context=torch.cat([ref, mot], 1), audio_kv=kv,
                              audio_bias=self.audio_bias(audio_tokens.device), face_mask=fm,
                              human_weight=0.2 + human, output_weight=self.output_weight(face_mask),
                              guided=null_audio)

    # --- per step -----------------------------------------------------------------------------------
    def embed(self, x, t, cond):
        """Noisy chunk latents [B, W, C, H, W] + t [B] -> (tokens [B, R+M+N, D], c [B, D])."""
        cfg = self.cfg
        h = self._frame_tokens(self.x_embed(self.patchify(x)), 1 + cfg.motion_frames, cfg.frames)
        return torch.cat([cond.context, h], 1), self.t_embedder(t)

    def audio_step(self, i, h, cond):
        """Run audio block i on the chunk tokens of the full sequence h."""
        n_ctx = cond.context.shape[1]
        x = h[:, n_ctx:]
        x = x + self.audio_blocks[i](x, cond.audio_kv[i], cond.audio_bias, cond.face_mask)
        return torch.cat([h[:, :n_ctx], x], 1)

    def head(self, h, c, cond):
        """Final layer on the chunk tokens -> velocity [B, W, C, H, W]."""
        x = self.final_layer(h[:, cond.context.shape[1]:], c)
        return self.unpatchify(x, self.cfg.frames)

    def forward(self, x, t, cond: ChunkCondition):
        h, c = self.embed(x, t, cond)
        for idx, block in enumerate(self.blocks):
            h = block(h, c)
            if idx in self.audio_slot:
                h = self.audio_step(self.audio_slot[idx], h, cond)
        return self.head(h, c, cond)
