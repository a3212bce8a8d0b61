"""SyncCache on the Wan-S2V and HunyuanVideo-Avatar stand-ins: spans, reuse with fresh audio, exactness."""
import pytest
import torch

from synccache import BlockLayout, LayoutError, Schedule, SyncCacheConfig, apply_synccache
from synccache.standins import (HUNYUAN_AVATAR_DEPTHS, WAN_S2V_DEPTH, WAN_S2V_INJECT, HunyuanAvatarStandIn,
                                WanS2VStandIn, hunyuan_avatar_layout, wan_s2v_layout)

torch.set_num_threads(1)
STEPS = 5
LOOSE = SyncCacheConfig(threshold=1e9, warmup=1, max_reuse=100)  # reuse whenever allowed
B, C, T, H, W = 1, 4, 2, 8, 8  # latents: 2 frames of 8x8 -> 16 tokens per frame with 1x2x2 patches


def _wan():
    torch.manual_seed(0)
    model = WanS2VStandIn().eval()
    face = torch.zeros(B, 32, 32)
    face[:, 8:24, 10:22] = 1
    cond = dict(context=torch.randn(B, 6, 16), ref_latents=torch.randn(B, C, 1, H, W),
                motion_latents=torch.randn(B, C, 1, H, W), audio=torch.randn(B, T, 16), human_mask=face)
    return model, cond, wan_s2v_layout(model)


def _hunyuan():
    torch.manual_seed(0)
    model = HunyuanAvatarStandIn().eval()
    face = torch.zeros(B, 1, 1, 32, 32)
    face[..., 8:24, 10:22] = 1
    cond = dict(ref_latents=torch.randn(B, C, 1, H, W), text_states=torch.randn(B, 5, 16),
                text_states_2=torch.randn(B, 16), audio_prompts=torch.randn(B, 4 * T - 3, 16), face_mask=face)
    return model, cond, hunyuan_avatar_layout(model)


MODELS = {"wan": _wan, "hunyuan": _hunyuan}


@pytest.fixture(scope="module", params=sorted(MODELS))
def setup(request):
    model, cond, layout = MODELS[request.param]()
    torch.manual_seed(1)
    return request.param, model, cond, layout, torch.randn(B, C, T, H, W)


@torch.no_grad()
def _euler(model, cond, noise, steps=STEPS, per_step=None):
    """Flow-matching Euler loop as engine.sampler.sample (t: 1 -> 0, the models take t * 1000)."""
    ts, x = torch.linspace(1.0, 0.0, steps + 1), noise
    for i in range(steps):
        x = x + (ts[i + 1] - ts[i]) * model(x, (ts[i] * 1000).expand(x.shape[0]), **cond)
        if per_step is not None:
            per_step()
    return x


def _hook_state(model):
    return [(len(m._forward_pre_hooks), len(m._forward_hooks), "forward" in m.__dict__) for m in model.modules()]


# --- spans ----------------------------------------------------------------------------------------
def test_wan_layout_follows_the_injection_pattern():
    model, _, layout = _wan()
    assert len(layout.heavy) == WAN_S2V_DEPTH == 40 and len(layout.audio) == 12
    assert layout.audio_after == WAN_S2V_INJECT == (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    assert layout.spans() == [(0, 0), (1, 4), (5, 8), (9, 12), (13, 16), (17, 20), (21, 24), (25, 27),
                              (28, 30), (31, 33), (34, 36), (37, 39)]
    assert layout.cacheable_spans(probing=True)[0] is None  # span 0 is the probe itself
    assert layout.audio == list(model.audio_injector.injector)
    # WanModel_S2V's class defaults (32 layers, [0, 4, ..., 24, 27]): the last span is 28..31
    short = wan_s2v_layout(WanS2VStandIn(depth=32, inject_layers=(0, 4, 8, 12, 16, 20, 24, 27)))
    assert short.spans()[-1] == (28, 31)


def test_hunyuan_layout_follows_the_adapter_pattern():
    model, _, layout = _hunyuan()
    assert len(layout.heavy) == 6 + 4 and layout.audio_after == (1, 3, 5)
    assert layout.heavy[:6] == list(model.double_blocks) and layout.heavy[6:] == list(model.single_blocks)
    assert layout.spans() == [(0, 1), (2, 3), (4, 5), (6, 9)]  # the single-stream blocks are one span
    n_double, n_single = HUNYUAN_AVATAR_DEPTHS
    real = hunyuan_avatar_layout(HunyuanAvatarStandIn(depth_double=n_double, depth_single=n_single,
                                                      dim=8, heads=1, adapter_dim_head=4))
    assert real.audio_after == (1, 3, 5, 7, 9, 11, 13, 15, 17, 19)
    assert real.spans() == [(i, i + 1) for i in range(0, 20, 2)] + [(20, 59)]


def test_human_weight_emphasises_the_mask(setup):
    name, model, cond, layout, noise = setup
    args = (noise, torch.ones(B))
    w = layout.human_weight(args, cond)
    n_video = T * 16
    if name == "wan":  # [video | reference | motion]
        video, ctx = w[:, :n_video], w[:, n_video:]
        assert w.shape == (B, n_video + 16 + 16)
    else:  # [reference frame | video | text]
        video, ctx = w[:, 16:16 + n_video], torch.cat([w[:, :16], w[:, 16 + n_video:]], 1)
        assert w.shape == (B, 16 + n_video + 5)
    assert video.max() > video.min() == pytest.approx(0.2) and torch.all(ctx == video.min())
    no_mask = {k: v for k, v in cond.items() if k not in ("human_mask", "face_mask")}
    assert layout.human_weight(args, no_mask) is None


# --- exactness ------------------------------------------------------------------------------------
def test_disabled_is_bit_identical(setup):
    _, model, cond, layout, noise = setup
    plain = _euler(model, cond, noise)
    with apply_synccache(model, SyncCacheConfig(enabled=False, threshold=1e9), layout) as h:
        out = _euler(model, cond, noise)
        assert h.stats()["mode"] == "off" and h.stats()["reuse_steps"] == 0
    assert torch.equal(out, plain)


def test_zero_threshold_computes_everything_exactly(setup):
    _, model, cond, layout, noise = setup
    plain = _euler(model, cond, noise)
    with apply_synccache(model, SyncCacheConfig(threshold=0.0), layout) as h:
        out = _euler(model, cond, noise)
        assert h.stats()["decisions"] == "C" * STEPS
    assert torch.equal(out, plain)


def test_remove_restores_exactly(setup):
    _, model, cond, layout, noise = setup
    before = _hook_state(model)
    plain = _euler(model, cond, noise)
    h = apply_synccache(model, LOOSE, layout)
    cached = _euler(model, cond, noise)
    assert not torch.equal(cached, plain) and torch.isfinite(cached).all()
    h.remove()
    assert _hook_state(model) == before
    assert all(type(b).forward is b.forward.__func__ for b in layout.heavy)
    assert torch.equal(_euler(model, cond, noise), plain)


# --- reuse with fresh audio -----------------------------------------------------------------------
def test_reuses_steps_and_runs_every_audio_block_every_step(setup):
    _, model, cond, layout, noise = setup
    calls, hooks = {}, []

    def counter(key):
        def hook(mod, args):
            calls[key] = calls.get(key, 0) + 1
        return hook
    for i, blk in enumerate(layout.audio):
        hooks.append(blk.register_forward_pre_hook(counter(("audio", i))))
    for i, blk in enumerate(layout.heavy):  # work inside a heavy block, not calls to the (wrapped) block
        hooks += [m.register_forward_pre_hook(counter(("heavy", i))) for m in blk.modules() if m is not blk]
    per_step = []

    def record():
        per_step.append(dict(calls))
        calls.clear()
    try:
        with apply_synccache(model, LOOSE, layout) as h:
            _euler(model, cond, noise, per_step=record)
            s = h.stats()
    finally:
        for hk in hooks:
            hk.remove()
    assert s["decisions"] == "C" + "R" * (STEPS - 1) and s["reuse_steps"] == STEPS - 1
    assert s["audio_calls"] == STEPS * len(layout.audio)
    cacheable = [i for c in layout.cacheable_spans(probing=True) if c for i in range(c[0], c[1] + 1)]
    for step, c in enumerate(per_step):
        assert all(c.get(("audio", i)) == 1 for i in range(len(layout.audio))), step
        ran = sorted(i for kind, i in c if kind == "heavy")
        if s["decisions"][step] == "C":
            assert ran == list(range(len(layout.heavy)))
        else:  # only the probe (and any uncacheable block) did work
            assert ran == sorted(set(range(len(layout.heavy))) - set(cacheable)) and 0 in ran


def test_default_threshold_mixes_reuse_and_compute(setup):
    """The default probe config (threshold 0.15, warmup 2, max_reuse 3) both reuses and recomputes."""
    _, model, cond, layout, noise = setup
    steps = 8
    with apply_synccache(model, SyncCacheConfig(), layout) as h:
        out = _euler(model, cond, noise, steps=steps)
        s = h.stats()
    assert s["decisions"].startswith("CC") and 0 < s["reuse_steps"] < steps - 2
    assert "RRRR" not in s["decisions"] and s["audio_calls"] == steps * len(layout.audio)
    assert torch.isfinite(out).all()


def test_audio_is_fresh_on_a_reuse_step(setup):
    """Schedule: step 1 bypasses every cacheable span; only the audio of step 1 changes; the output must too."""
    name, model, cond, layout, noise = setup
    key = "audio" if name == "wan" else "audio_prompts"
    spans = layout.spans()
    sched = Schedule(reuse=[[0, 1] for _ in spans], spans=[list(p) for p in spans])
    t = torch.full((B,), 500.0)
    other = dict(cond, **{key: torch.randn_like(cond[key])})
    outs = {}
    with apply_synccache(model, SyncCacheConfig(schedule=sched), layout) as h, torch.no_grad():
        for label, step1 in (("same", cond), ("other", other)):
            h.reset()
            v0 = model(noise, t, **cond)
            outs[label] = model(noise, t, **step1)
            assert h.stats()["decisions"] == "CR"
    # same inputs: reuse adds back exactly the residuals just computed
    assert torch.allclose(outs["same"], v0, atol=1e-5)
    # new audio reaches the output although every heavy span was bypassed
    assert (outs["other"] - outs["same"]).abs().max() > 1e-4


# --- errors ---------------------------------------------------------------------------------------
def test_wrong_human_weight_shape_raises(setup):
    name, model, cond, layout, noise = setup
    if name == "wan":  # a mask for another batch size
        bad_cond = dict(cond, human_mask=torch.ones(B + 1, 32, 32))
        bad_layout = layout
    else:  # a weight that forgets the reference and text tokens
        bad_cond = cond
        n_video = T * 16
        bad_layout = BlockLayout(heavy=layout.heavy, audio=layout.audio, audio_after=layout.audio_after,
                                 human_weight=lambda a, k: layout.human_weight(a, k)[:, 16:16 + n_video])
    with apply_synccache(model, SyncCacheConfig(), bad_layout):
        with pytest.raises(LayoutError, match="human weight has shape"):
            _euler(model, bad_cond, noise, steps=2)
    assert torch.isfinite(_euler(model, cond, noise, steps=2)).all()  # removed cleanly after the error
    with pytest.raises(LayoutError, match="human_mask has shape"):
        wan_s2v_layout(WanS2VStandIn(depth=1, inject_layers=(0,))).human_weight(
            (noise, torch.ones(B)), dict(_wan()[1], human_mask=torch.ones(B, 3, 32, 32)))
    with pytest.raises(LayoutError, match="not a Wan-S2V-like"):
        wan_s2v_layout(HunyuanAvatarStandIn())
    with pytest.raises(ValueError, match="inject_layers"):
        WanS2VStandIn(depth=4, inject_layers=(0, 4))
