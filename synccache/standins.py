"""Tiny stand-ins with the forward structure of Wan-S2V and HunyuanVideo-Avatar, and their BlockLayouts.

The real models are 14B / 13B and GPU-only; these stand-ins (random init, hidden 32) keep only what
SyncCache depends on: which heavy blocks run in which order, after which of them an audio block runs,
which tokens the audio touches, and which mask the forward receives. Read from the sources:

Wan-S2V (Wan-Video/Wan2.2, wan/modules/s2v/model_s2v.py, audio_utils.py, wan/configs/wan_s2v_14B.py):
- 14B config: num_layers=40, audio_inject_layers=[0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39]
  (every 4th block up to 24, then every 3rd to 39; the class default is [0, 4, ..., 24, 27] for 32
  layers). AudioInjector_WAN numbers its injectors in block order: injected_block_id {block: injector}
  (it matches blocks by the substring f"transformer_blocks.{id}" of module names; harmless for these ids).
- forward: `for idx, block in enumerate(self.blocks): x = block(x, **kwargs);
  x = self.after_transformer_block(idx, x)`; blocks take x [B, L, D] first. The sequence is
  [noisy video tokens | reference tokens | motion tokens] (+ a learned segment embedding,
  trainable_cond_mask); with zero_timestep the reference/motion segment is modulated with t = 0.
  Each block: per-segment adaLN self-attention, text cross-attention, per-segment adaLN FFN.
- after_transformer_block: only the video tokens x[:, :original_seq_len] are rearranged per frame
  "b (t n) c -> (b t) n c", normed (AdaLayerNorm on the per-frame global audio embedding, as the 14B
  config sets enable_adain=True, adain_mode="attn_norm"), cross-attend to that frame's audio tokens
  (num_audio_token=4), and the result is added back: a residual, written in place. No face mask.
- the head reads the video tokens only.

HunyuanVideo-Avatar (Tencent-Hunyuan/HunyuanVideo-Avatar, hymm_sp/modules/models_audio.py,
audio_adapters.py, diffusion/pipelines/pipeline_hunyuan_video_audio.py):
- HYVideo-T/2: 20 double-stream blocks, then 40 single-stream blocks, hidden 3072.
- DoubleStreamBlock(img, txt, vec, ...) -> (img, txt): separate modulation / qkv / MLP per stream and
  one joint attention over [img | txt]. SingleStreamBlock(x, vec, txt_len, ...) on x = [img | txt].
- img = [tokens of the first reference frame | video tokens]; video tokens also get
  before_proj(ref_in(ref_latents)) added.
- double_stream_list = [1, 3, ..., 19]: after those double blocks, PerceiverAttentionCA (zero-init
  to_out, one head) lets each latent frame's video tokens (queries) attend to 16 audio tokens of that
  frame (audio_proj gives 4 tokens per audio frame; the first frame is repeated 3 times, then 4 frames
  are grouped per latent frame). Its output is a delta: img = img + cat(zeros for the reference tokens,
  delta * face_mask); the text stream is not touched. single_stream_list is empty.
- face_mask [B, 1, T or 1, H, W] is nearest-interpolated to the token grid.
- Its own cache (is_cache): of 50 steps, 0-14, 15, 20, ..., 40 and 41-49 are computed (no_cache_steps);
  on the others it reuses the input of the last single block and runs only that block, so every audio
  adapter is skipped on cached steps.

Simplified here (and why it does not matter to SyncCache): no RoPE, no sequence parallelism, no
classifier-free-guidance batching; Wan-S2V's pose encoder (cond_states), framepack motion packing and
wav2vec layer weighting are replaced by one patch embedding for motion latents and one Linear audio
encoder over per-latent-frame features; HunyuanVideo-Avatar's token refiner, motion/pose/fps embedders
and AudioProjNet2 are Linears, or dropped. Audio projections are randomly initialised (the real ones
are zero-initialised), so the audio changes the output from the first step. The model's forward adds
the audio delta out of place (Wan-S2V writes it in place), because SyncCache assumes blocks never
modify their input in place. Wan-S2V keeps the injected sequence length and audio embedding as module
attributes between calls; the stand-in passes them as arguments. HunyuanVideo-Avatar's block counts
shrink to 6 double + 4 single by default (HUNYUAN_AVATAR_DEPTHS gives the real 20 + 40), keeping
adapters after every odd double block.

Conventions the layouts rely on:
- Audio blocks RETURN A DELTA that the model's forward adds to the hidden state (as engine's AudioBlock
  does); a HunyuanVideo-Avatar adapter's delta is multiplied by the face mask in the forward, as there.
- Heavy blocks take the hidden state [B, L, D] first and return that shape. A double-stream block has
  two streams, so the stand-in's forward calls it through `JointDoubleStream`, which takes the
  concatenated [img | txt] tensor and `txt_len`, splits, runs the two-stream block, and concatenates.
  Caching the real model needs the same wrapper around each DoubleStreamBlock.
- Wan-S2V's forward receives no person mask; the stand-in accepts `human_mask` only for the layout's
  probe weight (the model ignores it). HunyuanVideo-Avatar's weight comes from its face_mask.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from synccache.layout import BlockLayout, LayoutError
from synccache.wan_s2v import injection_order

WAN_S2V_DEPTH = 40
WAN_S2V_INJECT = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)  # wan_s2v_14B.py audio_inject_layers
HUNYUAN_AVATAR_DEPTHS = (20, 40)  # HYVideo-T/2: double-stream, single-stream blocks
BACKGROUND = 0.2  # probe weight of a token outside the mask (engine's ChunkCondition uses 0.2 + mask)


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding of t [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


def _tokens(z):
    """Patch-embedded [B, D, T, h, w] -> tokens [B, T*h*w, D]."""
    return z.flatten(2).transpose(1, 2)


def _heads(x, n):
    """[B, L, n*hd] -> [B, n, L, hd]."""
    b, length, _ = x.shape
    return x.view(b, length, n, -1).transpose(1, 2)


def _merge(x):
    """[B, n, L, hd] -> [B, L, n*hd]."""
    b, _, length, _ = x.shape
    return x.transpose(1, 2).reshape(b, length, -1)


# --- Wan-S2V ---------------------------------------------------------------------------------------
class WanAttention(nn.Module):
    """Multi-head attention with RMS qk-norm: self-attention, or cross-attention when given a context."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)

    def forward(self, x, context=None):
        ctx = x if context is None else context
        q, k = _heads(self.norm_q(self.q(x)), self.heads), _heads(self.norm_k(self.k(ctx)), self.heads)
        return self.o(_merge(F.scaled_dot_product_attention(q, k, _heads(self.v(ctx), self.heads))))


def _per_segment(m, seg, length):
    """Modulation [B, 2, D] -> per token [B, L, D]: row 0 for tokens < seg, row 1 for the rest."""
    b, _, d = m.shape
    return torch.cat([m[:, :1].expand(b, seg, d), m[:, 1:].expand(b, length - seg, d)], 1)


class WanS2VBlock(nn.Module):
    """WanS2VAttentionBlock: per-segment adaLN self-attention, text cross-attention, per-segment FFN."""

    def __init__(self, dim, ffn_dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.self_attn = WanAttention(dim, heads)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)  # cross_attn_norm=True
        self.cross_attn = WanAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x, e, seg, context):
        """x [B, L, D]; e [B, 6, 2, D] (segment 0: tokens < seg, at t; segment 1: the rest, at t = 0)."""
        length = x.shape[1]
        shift1, scale1, gate1, shift2, scale2, gate2 = (
            _per_segment(m, seg, length) for m in (self.modulation.unsqueeze(2) + e).unbind(1))
        x = x + gate1 * self.self_attn(self.norm1(x) * (1 + scale1) + shift1)
        x = x + self.cross_attn(self.norm3(x), context)
        return x + gate2 * self.ffn(self.norm2(x) * (1 + scale2) + shift2)


class WanAudioInjection(nn.Module):
    """One audio injection: AdaLayerNorm on the frame's global audio, cross-attention to its audio tokens.

    Real Wan-S2V keeps the parts in parallel lists (audio_injector.injector_adain_layers[j],
    audio_injector.injector[j]); here one module, so the layout sees one audio block per injection.
    """

    def __init__(self, dim, heads):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.adain = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.attn = WanAttention(dim, heads)

    def forward(self, x, audio, audio_global):
        """x [B, T*n, D] video tokens; audio [B, T, A, D]; audio_global [B, T, D] -> delta [B, T*n, D]."""
        b, t, a, d = audio.shape
        x = x.reshape(b * t, -1, d)  # "b (t n) c -> (b t) n c"
        shift, scale = self.adain(audio_global.reshape(b * t, d)).chunk(2, -1)
        h = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        return self.attn(h, audio.reshape(b * t, a, d)).reshape(b, -1, d)


class WanAudioInjector(nn.Module):
    """AudioInjector_WAN: injector[j] runs after block b where injected_block_id[b] = j."""

    def __init__(self, inject_layers, dim, heads):
        super().__init__()
        self.injected_block_id = {int(b): j for j, b in enumerate(sorted(set(inject_layers)))}
        self.injector = nn.ModuleList(WanAudioInjection(dim, heads) for _ in self.injected_block_id)


class WanS2VStandIn(nn.Module):
    """WanModel_S2V's forward at toy size: 40 blocks, audio injected after WAN_S2V_INJECT."""

    def __init__(self, depth=WAN_S2V_DEPTH, inject_layers=WAN_S2V_INJECT, dim=32, heads=2, ffn_dim=64,
                 in_dim=4, text_dim=16, audio_dim=16, num_audio_token=4, freq_dim=32, patch_size=(1, 2, 2)):
        super().__init__()
        if any(not 0 <= b < depth for b in inject_layers):
            raise ValueError(f"inject_layers {tuple(inject_layers)} must lie in 0..{depth - 1}")
        self.dim, self.in_dim, self.freq_dim, self.patch_size = dim, in_dim, freq_dim, tuple(patch_size)
        self.num_audio_token = num_audio_token
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.trainable_cond_mask = nn.Embedding(3, dim)  # 0 video, 1 reference, 2 motion
        self.casual_audio_encoder = nn.Linear(audio_dim, (num_audio_token + 1) * dim)  # tokens + global
        self.blocks = nn.ModuleList(WanS2VBlock(dim, ffn_dim, heads) for _ in range(depth))
        self.audio_injector = WanAudioInjector(inject_layers, dim, heads)
        self.head_norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.head_modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)
        self.head = nn.Linear(dim, in_dim * math.prod(patch_size))

    def encode_audio(self, audio):
        """Per-latent-frame features [B, T, Da] -> (tokens [B, T, A, D], global [B, T, D])."""
        b, t, _ = audio.shape
        z = self.casual_audio_encoder(audio).view(b, t, self.num_audio_token + 1, self.dim)
        return z[:, :, 1:], z[:, :, 0]

    def after_transformer_block(self, block_idx, x, n_video, audio, audio_global):
        """Add the audio injection's delta to the video tokens, if block_idx is an injection point."""
        j = self.audio_injector.injected_block_id.get(block_idx)
        if j is None:
            return x
        delta = self.audio_injector.injector[j](x[:, :n_video], audio, audio_global)
        return torch.cat([x[:, :n_video] + delta, x[:, n_video:]], 1)

    def forward(self, x, t, context, ref_latents, motion_latents, audio, human_mask=None):
        """Velocity for x [B, C, T, H, W] at t [B] (0..1000).

        context [B, Lt, Dt] text; ref_latents [B, C, 1, H, W]; motion_latents [B, C, Tm, H, W];
        audio [B, T, Da]; human_mask [B, (T,) H', W'] is read only by wan_s2v_layout (the probe weight).
        """
        b, _, frames, hh, ww = x.shape
        vid = _tokens(self.patch_embedding(x))
        ref = _tokens(self.patch_embedding(ref_latents))
        mot = _tokens(self.patch_embedding(motion_latents))
        n_video = vid.shape[1]
        seg_ids = torch.cat([torch.full((n,), i, dtype=torch.long, device=x.device)
                             for i, n in enumerate((n_video, ref.shape[1], mot.shape[1]))])
        h = torch.cat([vid, ref, mot], 1) + self.trainable_cond_mask(seg_ids)
        tokens, glob = self.encode_audio(audio)
        e = self.time_embedding(timestep_embedding(torch.cat([t, t.new_zeros(1)]), self.freq_dim))
        e0 = self.time_projection(e).unflatten(1, (6, self.dim))  # [B + 1, 6, D]; the last row is t = 0
        e0 = torch.stack([e0[:b], e0[b:].expand(b, -1, -1)], 2)  # [B, 6, 2, D]  (zero_timestep)
        ctx = self.text_embedding(context)
        for idx, block in enumerate(self.blocks):
            h = block(h, e0, n_video, ctx)
            h = self.after_transformer_block(idx, h, n_video, tokens, glob)
        shift, scale = (self.head_modulation + e[:b, None]).unbind(1)
        out = self.head(self.head_norm(h[:, :n_video]) * (1 + scale[:, None]) + shift[:, None])
        pt, ph, pw = self.patch_size
        gt, gh, gw = frames // pt, hh // ph, ww // pw
        out = out.view(b, gt, gh, gw, self.in_dim, pt, ph, pw)
        return torch.einsum("bthwcopq->bctohpwq", out).reshape(b, self.in_dim, frames, hh, ww)


# --- HunyuanVideo-Avatar ---------------------------------------------------------------------------
def _modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _mlp(dim, ratio):
    hid = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hid), nn.GELU(approximate="tanh"), nn.Linear(hid, dim))


class DoubleStreamBlock(nn.Module):
    """Two streams with their own modulation, qkv and MLP, joined in one attention: (img, txt) -> (img, txt)."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.heads = heads
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)))
            setattr(self, f"{s}_norm1", nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False))
            setattr(self, f"{s}_attn_qkv", nn.Linear(dim, 3 * dim))
            setattr(self, f"{s}_attn_q_norm", nn.RMSNorm(dim // heads, eps=1e-6))
            setattr(self, f"{s}_attn_k_norm", nn.RMSNorm(dim // heads, eps=1e-6))
            setattr(self, f"{s}_attn_proj", nn.Linear(dim, dim))
            setattr(self, f"{s}_norm2", nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False))
            setattr(self, f"{s}_mlp", _mlp(dim, mlp_ratio))

    def _qkv(self, s, x, shift, scale):
        x = _modulate(getattr(self, f"{s}_norm1")(x), shift, scale)
        q, k, v = (_heads(z, self.heads) for z in getattr(self, f"{s}_attn_qkv")(x).chunk(3, -1))
        return getattr(self, f"{s}_attn_q_norm")(q), getattr(self, f"{s}_attn_k_norm")(k), v

    def _out(self, s, x, attn, mod):
        shift1, scale1, gate1, shift2, scale2, gate2 = mod
        x = x + gate1.unsqueeze(1) * getattr(self, f"{s}_attn_proj")(attn)
        mlp = getattr(self, f"{s}_mlp")(_modulate(getattr(self, f"{s}_norm2")(x), shift2, scale2))
        return x + gate2.unsqueeze(1) * mlp

    def forward(self, img, txt, vec):
        """img [B, Li, D], txt [B, Lt, D], vec [B, D] -> (img, txt)."""
        img_mod, txt_mod = self.img_mod(vec).chunk(6, -1), self.txt_mod(vec).chunk(6, -1)
        iq, ik, iv = self._qkv("img", img, img_mod[0], img_mod[1])
        tq, tk, tv = self._qkv("txt", txt, txt_mod[0], txt_mod[1])
        attn = _merge(F.scaled_dot_product_attention(torch.cat([iq, tq], 2), torch.cat([ik, tk], 2),
                                                     torch.cat([iv, tv], 2)))
        n = img.shape[1]
        return self._out("img", img, attn[:, :n], img_mod), self._out("txt", txt, attn[:, n:], txt_mod)


class JointDoubleStream(nn.Module):
    """Heavy-block adapter: [img | txt] [B, L, D] + txt_len -> the double-stream block's [img | txt]."""

    def __init__(self, block: DoubleStreamBlock):
        super().__init__()
        self.block = block

    def forward(self, x, vec, txt_len):
        n = x.shape[1] - txt_len
        return torch.cat(self.block(x[:, :n], x[:, n:], vec), 1)


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over [img | txt] with one modulation (txt_len is only for RoPE there)."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.heads, self.mlp_hidden = heads, int(dim * mlp_ratio)
        self.pre_norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.q_norm, self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6), nn.RMSNorm(dim // heads, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")

    def forward(self, x, vec, txt_len):
        shift, scale, gate = self.modulation(vec).chunk(3, -1)
        qkv, mlp = self.linear1(_modulate(self.pre_norm(x), shift, scale)).split(
            [3 * x.shape[-1], self.mlp_hidden], -1)
        q, k, v = (_heads(z, self.heads) for z in qkv.chunk(3, -1))
        attn = _merge(F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v))
        return x + gate.unsqueeze(1) * self.linear2(torch.cat([attn, self.mlp_act(mlp)], -1))


class PerceiverAttentionCA(nn.Module):
    """Audio adapter: per latent frame, video tokens (queries) attend to that frame's audio tokens -> delta."""

    def __init__(self, dim, dim_head):
        super().__init__()
        self.dim_head = dim_head
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_out = nn.Linear(dim_head, dim, bias=False)

    def forward(self, x, latents):
        """x: audio [B, T, a, D]; latents: video tokens [B, T, hw, D] -> delta [B, T, hw, D]."""
        q = self.to_q(self.norm2(latents))
        k, v = self.to_kv(self.norm1(x)).chunk(2, -1)
        s = 1 / math.sqrt(math.sqrt(self.dim_head))
        w = torch.softmax(((q * s) @ (k * s).transpose(-2, -1)).float(), -1).type(q.dtype)
        return self.to_out(w @ v)


class FinalLayer(nn.Module):
    """adaLN + linear to patch velocities."""

    def __init__(self, dim, out_dim):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, -1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class HunyuanAvatarStandIn(nn.Module):
    """HYVideoDiffusionTransformer (audio) forward at toy size: double blocks with audio adapters after the
    odd ones (face-masked), then single blocks. Default depths 6 + 4; HUNYUAN_AVATAR_DEPTHS is the real 20 + 40.
    """

    AUDIO_TOKENS = 4  # audio_proj tokens per audio frame
    FRAMES_PER_LATENT = 4  # audio frames grouped per latent frame (causal VAE: 4k + 1 frames -> k + 1)

    def __init__(self, depth_double=6, depth_single=4, dim=32, heads=2, mlp_ratio=4.0, in_dim=4, text_dim=16,
                 text_dim_2=16, audio_dim=16, adapter_dim_head=16, freq_dim=32, patch_size=(1, 2, 2)):
        super().__init__()
        self.dim, self.in_dim, self.freq_dim, self.patch_size = dim, in_dim, freq_dim, tuple(patch_size)
        self.img_in = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.ref_in = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.before_proj = nn.Linear(dim, dim)
        self.txt_in = nn.Linear(text_dim, dim)  # the real one is a token refiner
        self.time_in = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.vector_in = nn.Sequential(nn.Linear(text_dim_2, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.audio_proj = nn.Linear(audio_dim, self.AUDIO_TOKENS * dim)  # the real one is AudioProjNet2
        self.double_blocks = nn.ModuleList(JointDoubleStream(DoubleStreamBlock(dim, heads, mlp_ratio))
                                           for _ in range(depth_double))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(dim, heads, mlp_ratio) for _ in range(depth_single))
        self.double_stream_list = list(range(1, depth_double, 2))  # [1, 3, ..., 19] in the real model
        self.double_stream_map = {i: j for j, i in enumerate(self.double_stream_list)}
        self.audio_adapter_blocks = nn.ModuleList(PerceiverAttentionCA(dim, adapter_dim_head)
                                                  for _ in self.double_stream_list)
        self.final_layer = FinalLayer(dim, in_dim * math.prod(patch_size))

    def token_grid(self, x):
        """Latent [B, C, T, H, W] -> the token grid (T', h, w)."""
        return tuple(s // p for s, p in zip(x.shape[2:], self.patch_size))

    @staticmethod
    def face_tokens(face_mask, grid):
        """face_mask [B, 1, T or 1, H, W] -> per video token [B, T'*h*w], nearest on the token grid."""
        if face_mask.shape[2] == 1:
            face_mask = face_mask.repeat(1, 1, grid[0], 1, 1)
        return F.interpolate(face_mask.float(), size=list(grid), mode="nearest").flatten(1)

    def audio_tokens(self, audio_prompts, frames):
        """Audio features [B, 4*T - 3, Da] -> per latent frame audio tokens [B, T, 16, D]."""
        b, f, _ = audio_prompts.shape
        k = self.FRAMES_PER_LATENT
        if f + k - 1 != k * frames:
            raise ValueError(f"audio_prompts has {f} frames; {k * frames - k + 1} expected "
                             f"for {frames} latent frames")
        a = self.audio_proj(audio_prompts).view(b, f, self.AUDIO_TOKENS, self.dim)
        a = torch.cat([a[:, :1].repeat(1, k - 1, 1, 1), a], 1)
        return a.reshape(b, frames, k * self.AUDIO_TOKENS, self.dim)

    def forward(self, x, t, ref_latents, text_states, text_states_2, audio_prompts, face_mask):
        """Velocity for x [B, C, T, H, W] at t [B] (0..1000).

        ref_latents [B, C, T or 1, H, W]; text_states [B, Lt, Dt]; text_states_2 [B, Dt2] (pooled);
        audio_prompts [B, 4*T - 3, Da]; face_mask [B, 1, T or 1, H', W'].
        """
        b, _, frames, hh, ww = x.shape
        grid = self.token_grid(x)
        vec = self.time_in(timestep_embedding(t, self.freq_dim)) + self.vector_in(text_states_2)
        audio = self.audio_tokens(audio_prompts, grid[0])
        if ref_latents.shape[2] == 1:
            ref_latents = ref_latents.expand(-1, -1, frames, -1, -1)
        ref_first = _tokens(self.img_in(ref_latents[:, :, :1]))
        img = self.before_proj(_tokens(self.ref_in(ref_latents))) + _tokens(self.img_in(x))
        ref_len = ref_first.shape[1]
        img = torch.cat([ref_first, img], 1)
        mask = self.face_tokens(face_mask, grid).unsqueeze(-1).type_as(img)  # [B, N, 1]
        txt = self.txt_in(text_states)
        txt_len = txt.shape[1]
        h = torch.cat([img, txt], 1)  # [img | txt]: what every heavy block sees
        n_img = img.shape[1]
        for layer_num, block in enumerate(self.double_blocks):
            h = block(h, vec, txt_len)
            j = self.double_stream_map.get(layer_num)
            if j is not None:  # audio adapter on the video tokens, scaled by the face mask
                video = h[:, ref_len:n_img].reshape(b, grid[0], -1, self.dim)
                delta = self.audio_adapter_blocks[j](audio, video).reshape(b, -1, self.dim)
                h = torch.cat([h[:, :ref_len], h[:, ref_len:n_img] + delta * mask, h[:, n_img:]], 1)
        for block in self.single_blocks:
            h = block(h, vec, txt_len)
        out = self.final_layer(h[:, ref_len:n_img], vec)
        pt, ph, pw = self.patch_size
        out = out.view(b, *grid, self.in_dim, pt, ph, pw)
        return torch.einsum("bthwcopq->bctohpwq", out).reshape(b, self.in_dim, frames, hh, ww)


# --- layouts ---------------------------------------------------------------------------------------
def _arg(args, kwargs, pos, name):
    """A model forward's argument by position or name (None if absent)."""
    return args[pos] if len(args) > pos else kwargs.get(name)


def _grid(latent, patch):
    """Token count of a latent [B, C, T, H, W] under patch (pt, ph, pw)."""
    return math.prod(s // p for s, p in zip(latent.shape[2:], patch))


def _with_context(video_w, before, after, context_weight):
    """[B, N] video-token weights -> [B, before + N + after], context tokens as reference_layout does."""
    b = video_w.shape[0]
    if context_weight is None:
        fill = video_w.amin(1, keepdim=True)
        ctx = lambda n: fill.expand(b, n)  # noqa: E731
    else:
        ctx = lambda n: video_w.new_full((b, n), float(context_weight))  # noqa: E731
    return torch.cat([ctx(before), video_w, ctx(after)], 1)


def wan_s2v_layout(model: nn.Module, background: float = BACKGROUND,
                   context_weight: Optional[float] = None) -> BlockLayout:
    """Layout of a WanS2VStandIn-like model: .blocks, audio_injector.{injector, injected_block_id}.

    Probe: block 0. Weight over [video | reference | motion] tokens: background + the fraction of each
    video token's patch covered by forward's `human_mask` [B, (T,) H', W'] (area-pooled to the token
    grid); reference and motion tokens get context_weight, or the sample's smallest video weight.
    """
    for name in ("blocks", "audio_injector", "patch_size"):
        if not hasattr(model, name):
            raise LayoutError(f"{type(model).__name__} has no .{name}; not a Wan-S2V-like model")
    inj = model.audio_injector
    order = injection_order(inj)
    patch = model.patch_size

    def human_weight(args, kwargs):
        mask = _arg(args, kwargs, 6, "human_mask")
        if mask is None:
            return None
        x = _arg(args, kwargs, 0, "x")
        frames, gh, gw = (s // p for s, p in zip(x.shape[2:], patch))
        if mask.dim() == 3:
            mask = mask[:, None]
        if mask.dim() != 4 or mask.shape[1] not in (1, frames):
            raise LayoutError(f"human_mask has shape {tuple(mask.shape)}, expected [B, H, W] or "
                              f"[B, 1 or {frames}, H, W]")
        frac = F.adaptive_avg_pool2d(mask.float(), (gh, gw)).expand(-1, frames, -1, -1).flatten(1)
        ref, mot = _arg(args, kwargs, 3, "ref_latents"), _arg(args, kwargs, 4, "motion_latents")
        n_ctx = _grid(ref, patch) + _grid(mot, patch)
        return _with_context(background + frac, 0, n_ctx, context_weight)

    return BlockLayout(heavy=list(model.blocks), audio=[inj.injector[j] for _, j in order],
                       audio_after=[blk for blk, _ in order], probe=0, human_weight=human_weight)


def hunyuan_avatar_layout(model: nn.Module, background: float = BACKGROUND,
                          context_weight: Optional[float] = None) -> BlockLayout:
    """Layout of a HunyuanAvatarStandIn-like model: heavy = double blocks (joint [img | txt] adapters)
    then single blocks; audio_adapter_blocks[j] after double block double_stream_list[j].

    Probe: double block 0. Weight over [reference-frame tokens | video tokens | text tokens]: background +
    forward's face_mask on the token grid (nearest, as the model scales the adapters); reference and text
    tokens get context_weight, or the sample's smallest video weight.
    """
    for name in ("double_blocks", "single_blocks", "audio_adapter_blocks", "double_stream_list"):
        if not hasattr(model, name):
            raise LayoutError(f"{type(model).__name__} has no .{name}; not a HunyuanVideo-Avatar-like model")
    if len(model.double_stream_list) != len(model.audio_adapter_blocks):
        raise LayoutError(f"double_stream_list has {len(model.double_stream_list)} entries "
                          f"for {len(model.audio_adapter_blocks)} audio adapters")
    if any(not 0 <= i < len(model.double_blocks) for i in model.double_stream_list):
        raise LayoutError(f"double_stream_list {model.double_stream_list} names blocks outside the "
                          f"{len(model.double_blocks)} double blocks")

    def human_weight(args, kwargs):
        face_mask = _arg(args, kwargs, 6, "face_mask")
        if face_mask is None:
            return None
        x, txt = _arg(args, kwargs, 0, "x"), _arg(args, kwargs, 3, "text_states")
        grid = model.token_grid(x)
        video_w = background + model.face_tokens(face_mask, grid)
        return _with_context(video_w, grid[1] * grid[2], txt.shape[1], context_weight)

    return BlockLayout(heavy=[*model.double_blocks, *model.single_blocks],
                       audio=list(model.audio_adapter_blocks), audio_after=list(model.double_stream_list),
                       probe=0, human_weight=human_weight)
