"""Peer baselines (synccache.baselines): reuse behaviour, audio skipped on reuse steps, exactness, errors."""
import json
import math

import pytest
import torch
import torch.nn as nn

from engine.model.dit import DiTConfig
from engine.sampler import sample
from synccache import SyncCacheConfig, apply_synccache, reference_layout
from synccache.baselines import (METHODS, BaselineConfig, apply_baseline, calibrate_baselines, deepcache_schedule,
                                 fora_schedule, load_calibration, nearest_interp, save_calibration)
from synccache.layout import BlockLayout, LayoutError

from dit_inputs import random_setup

torch.set_num_threads(1)
CFG = DiTConfig(hidden=64, depth=4, heads=2, mlp_ratio=2.0, audio_dim=32, audio_inner=32, audio_heads=2,
                audio_after=(1, 3))
STEPS = 8
N_AUDIO = len(CFG.audio_after)

LOOSE = {  # reuse whenever the method allows it
    "fora": dict(interval=3),
    "teacache": dict(threshold=1e9),
    "fbcache": dict(threshold=1e9),
    "magcache": dict(threshold=1e9, max_skips=2),
    "deepcache": dict(interval=3),
}
LOOSE_DECISIONS = {
    "fora": "CCRRCRRC",  # step index counts down 7..0: computed at 7 (first), 6, 3, 0
    "teacache": "C" + "R" * 6 + "C",  # the first and the last step are always computed
    "fbcache": "C" + "R" * 7,
    "magcache": "CRRCRRCR",  # retention int(8 * 0.2) = 1 step, then at most K = 2 skips in a row
    "deepcache": "CCCRRCRC",  # warm-up 2, tail 1, every 3rd step in between
}
TIGHT = {  # compute every step
    "fora": dict(interval=1),
    "teacache": dict(threshold=0.0),
    "fbcache": dict(threshold=0.0),
    "magcache": dict(threshold=0.0),
    "deepcache": dict(interval=1),
}
HEAVY_ON_REUSE = {"fora": [], "teacache": [], "magcache": [], "fbcache": [0], "deepcache": [CFG.depth - 1]}


@pytest.fixture(scope="module")
def setup():
    """A random-weight DiT, a chunk condition and noise."""
    return random_setup(CFG, seed=0)


@pytest.fixture(scope="module")
def calibration(setup):
    dit, cond, noise = setup

    def run():
        for seed in (1, 2):
            g = torch.Generator().manual_seed(seed)
            sample(dit, cond, torch.randn(noise.shape, generator=g), STEPS)
    return calibrate_baselines(dit, reference_layout(dit), run, steps=STEPS)


def _config(method, calibration, steps=STEPS, **kw):
    return BaselineConfig(method=method, steps=None if method == "fbcache" else steps,
                          calibration=calibration, **kw)


def _hook_state(dit):
    mods = [dit, *dit.blocks, *dit.audio_blocks, *(b.attn for b in dit.blocks), *(b.mlp for b in dit.blocks)]
    return [(len(m._forward_pre_hooks), len(m._forward_hooks), "forward" in m.__dict__) for m in mods]


# --- reuse and exactness --------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_loose_reuses_and_tight_is_exact(setup, calibration, method):
    dit, cond, noise = setup
    plain = sample(dit, cond, noise, STEPS)
    with apply_baseline(dit, _config(method, calibration, **LOOSE[method]), reference_layout(dit)) as h:
        loose = sample(dit, cond, noise, STEPS)
        s = h.stats()
    assert s["method"] == method and s["steps"] == STEPS
    assert s["decisions"] == LOOSE_DECISIONS[method]
    assert s["reuse_steps"] == LOOSE_DECISIONS[method].count("R") > 0
    assert s["computed_steps"] == STEPS - s["reuse_steps"]
    assert s["cache_bytes"] > 0 and s["peak_cache_bytes"] >= s["cache_bytes"]
    assert torch.isfinite(loose).all() and not torch.equal(loose, plain)
    with apply_baseline(dit, _config(method, calibration, **TIGHT[method]), reference_layout(dit)) as h:
        tight = sample(dit, cond, noise, STEPS)
        assert h.stats()["decisions"] == "C" * STEPS
    assert torch.equal(tight, plain)


@pytest.mark.parametrize("method", METHODS)
def test_reusing_an_identical_step_reproduces_it(setup, calibration, method):
    """Same input every step: whatever a reuse step replays (residual, feature, re-gated layers, audio
    deltas) must give back the computed output."""
    dit, cond, noise = setup
    t = torch.full((1,), 0.5)
    with torch.no_grad():
        ref = dit(noise, t, cond)
        with apply_baseline(dit, _config(method, calibration, **LOOSE[method]), reference_layout(dit)) as h:
            outs = [dit(noise, t, cond) for _ in range(STEPS)]
            d = h.stats()["decisions"]
    assert "R" in d
    for step, out in enumerate(outs):
        if d[step] == "C":
            assert torch.equal(out, ref), step
        else:
            assert torch.allclose(out, ref, atol=1e-5), (step, (out - ref).abs().max())


@pytest.mark.parametrize("method", METHODS)
def test_reuse_steps_skip_audio_blocks(setup, calibration, method):
    """The opposite of SyncCache: a peer's reuse step runs no audio block."""
    dit, cond, noise = setup
    calls, per_step = {}, []

    def counter(name):
        def hook(mod, args):
            calls[name] = calls.get(name, 0) + 1
        return hook
    # count the work inside the blocks, not calls to the (wrapped) blocks themselves
    hooks = [b.q.register_forward_pre_hook(counter(f"audio{j}")) for j, b in enumerate(dit.audio_blocks)]
    hooks += [b.attn.register_forward_pre_hook(counter(f"heavy{i}")) for i, b in enumerate(dit.blocks)]
    try:
        with apply_baseline(dit, _config(method, calibration, **LOOSE[method]), reference_layout(dit)) as h:
            hooks.append(dit.register_forward_pre_hook(lambda m, a: calls.clear()))
            hooks.append(dit.register_forward_hook(lambda m, a, o: per_step.append(dict(calls))))
            sample(dit, cond, noise, STEPS)
            s = h.stats()
    finally:
        for hk in hooks:
            hk.remove()
    d = s["decisions"]
    assert "R" in d and len(per_step) == STEPS
    for step, c in enumerate(per_step):
        audio = sorted(int(k[5:]) for k in c if k.startswith("audio"))
        heavy = sorted(int(k[5:]) for k in c if k.startswith("heavy"))
        if d[step] == "C":
            assert audio == list(range(N_AUDIO)) and heavy == list(range(CFG.depth)), (step, c)
        else:
            assert audio == [] and heavy == HEAVY_ON_REUSE[method], (step, c)
    assert s["audio_calls"] == N_AUDIO * s["computed_steps"]
    assert s["heavy_calls"] == CFG.depth * s["computed_steps"] + len(HEAVY_ON_REUSE[method]) * s["reuse_steps"]


def test_synccache_keeps_audio_where_peers_skip_it(setup, calibration):
    dit, cond, noise = setup
    with apply_synccache(dit, SyncCacheConfig(threshold=1e9, warmup=1, max_reuse=100), reference_layout(dit)) as h:
        sample(dit, cond, noise, STEPS)
        sync = h.stats()
    with apply_baseline(dit, _config("teacache", calibration, threshold=1e9), reference_layout(dit)) as h:
        sample(dit, cond, noise, STEPS)
        peer = h.stats()
    assert sync["reuse_steps"] > 0 and peer["reuse_steps"] > 0
    assert sync["audio_calls"] == N_AUDIO * STEPS
    assert peer["audio_calls"] == N_AUDIO * peer["computed_steps"] < N_AUDIO * STEPS


# --- attach / detach / reset ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fora", "teacache"])
def test_remove_restores_exactly(setup, calibration, method):
    dit, cond, noise = setup
    before = _hook_state(dit)
    plain = sample(dit, cond, noise, STEPS)
    h = apply_baseline(dit, _config(method, calibration, **LOOSE[method]), reference_layout(dit))
    assert not torch.equal(sample(dit, cond, noise, STEPS), plain)
    with pytest.raises(RuntimeError, match="already applied"):
        apply_baseline(dit, _config("fbcache", calibration), reference_layout(dit))
    with pytest.raises(RuntimeError, match="already applied"):
        calibrate_baselines(dit, reference_layout(dit), lambda: None, steps=STEPS)
    h.remove()
    h.remove()  # idempotent
    assert _hook_state(dit) == before
    assert all(type(b).forward is b.forward.__func__ for b in [*dit.blocks, *dit.audio_blocks])
    assert torch.equal(sample(dit, cond, noise, STEPS), plain)
    with apply_synccache(dit, SyncCacheConfig(), reference_layout(dit)):
        with pytest.raises(RuntimeError, match="already applied"):
            apply_baseline(dit, _config(method, calibration), reference_layout(dit))
    assert _hook_state(dit) == before


def test_steps_wrap_and_reset(setup, calibration):
    dit, cond, noise = setup
    with apply_baseline(dit, _config("teacache", calibration, threshold=1e9), reference_layout(dit)) as h:
        sample(dit, cond, noise, STEPS)
        sample(dit, cond, noise, STEPS)  # the counter wraps: a new sample starts computed
        assert h.stats()["decisions"] == LOOSE_DECISIONS["teacache"] * 2
        h.reset(keep_stats=True)  # per chunk, as ChunkGenerator does
        s = h.stats()
        assert s["steps"] == 2 * STEPS and s["cache_bytes"] == 0
        sample(dit, cond, noise, 3)  # a shorter run, then reset: the next sample starts fresh
        h.reset(keep_stats=True)
        sample(dit, cond, noise, STEPS)
        assert h.stats()["decisions"] == LOOSE_DECISIONS["teacache"] * 2 + "CRR" + LOOSE_DECISIONS["teacache"]
        h.reset()
        assert h.stats()["steps"] == 0 and h.stats()["decisions"] == ""


# --- schedules ------------------------------------------------------------------------------------
def test_fora_follows_its_interval(setup, calibration):
    dit, cond, noise = setup
    assert fora_schedule(STEPS, 3) == "CCRRCRRC" and fora_schedule(STEPS, 1) == "C" * STEPS
    for n in (1, 2, 3, 4):
        with apply_baseline(dit, _config("fora", calibration, interval=n), reference_layout(dit)) as h:
            sample(dit, cond, noise, STEPS)
            d = h.stats()["decisions"]
        assert d == fora_schedule(STEPS, n)
        idx = [STEPS - 1 - k for k in range(STEPS)]  # FORA's step index counts down
        assert all((c == "C") == (k == 0 or idx[k] % n == 0) for k, c in enumerate(d))


def test_deepcache_schedule_is_hunyuan_avatars():
    no_cache = set(range(15)) | set(range(15, 42, 5)) | set(range(41, 50))  # HunyuanVideo-Avatar, 50 steps
    assert {i for i, c in enumerate(deepcache_schedule(50)) if c == "C"} == no_cache
    d20 = deepcache_schedule(20)  # scaled: warm-up 6, tail 4, interval 2
    assert d20 == "C" * 6 + "CR" * 5 + "C" * 4
    assert deepcache_schedule(20, interval=1) == "C" * 20


# --- calibration ----------------------------------------------------------------------------------
def test_calibration_is_finite_and_round_trips(setup, calibration, tmp_path):
    dit, cond, noise = setup
    assert calibration["steps"] == STEPS and calibration["samples"] == 2
    coef = calibration["teacache"]["coefficients"]
    assert len(coef) == 5 and all(math.isfinite(c) for c in coef)
    assert len(calibration["teacache"]["input_rel_l1"]) == 2
    assert all(len(s) == STEPS - 1 for s in calibration["teacache"]["input_rel_l1"])
    mags = calibration["magcache"]["mag_ratios"]
    assert len(mags) == STEPS and mags[0] == 1.0 and all(math.isfinite(m) and m > 0 for m in mags)
    assert json.loads(json.dumps(calibration)) == calibration
    path = save_calibration(calibration, tmp_path / "cal.json")
    assert load_calibration(path) == calibration
    cfg = BaselineConfig("magcache", steps=5, calibration=str(path))
    with apply_baseline(dit, cfg, reference_layout(dit)) as h:
        assert h.mag == nearest_interp(mags, 5) and len(h.mag) == 5
        sample(dit, cond, noise, 5)
        assert h.stats()["steps"] == 5
    with pytest.raises(ValueError, match="not a whole number of samples"):
        calibrate_baselines(dit, reference_layout(dit), lambda: sample(dit, cond, noise, 3), steps=STEPS)


# --- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(method="nope"), "unknown baseline method"),
    (dict(method="fora", steps=8, threshold=0.1), "no threshold"),
    (dict(method="fora", steps=8, interval=0), "interval must be an integer >= 1"),
    (dict(method="deepcache", steps=8, interval=1.5), "interval must be an integer"),
    (dict(method="fbcache", interval=2), "no interval"),
    (dict(method="fbcache", threshold=-0.1), "threshold must be a finite number >= 0"),
    (dict(method="fbcache", threshold=float("nan")), "threshold must be a finite number"),
    (dict(method="fora"), "needs steps"),
    (dict(method="fora", steps=0), "steps must be an integer >= 1"),
    (dict(method="teacache", steps=8), "teacache needs calibration"),
    (dict(method="magcache", steps=8), "magcache needs calibration"),
    (dict(method="magcache", steps=8, calibration={"format": "x"}), "format"),
    (dict(method="magcache", steps=8, retention_ratio=1.5, calibration="CAL"), "retention_ratio"),
    (dict(method="magcache", steps=8, max_skips=-1, calibration="CAL"), "max_skips"),
    (dict(method="teacache", steps=8, calibration="NO_TEA"), "cannot drive teacache"),
    (dict(method="magcache", steps=8, calibration="BAD_MAG"), "mag_ratios"),
    (dict(method="deepcache", steps=8, keep_last=0), "keep_last"),
    (dict(method="teacache", steps=8, calibration="/nonexistent/cal.json"), "cannot read calibration"),
])
def test_bad_configs_raise(calibration, kwargs, match):
    cal = kwargs.get("calibration")
    if cal == "CAL":
        kwargs["calibration"] = calibration
    elif cal == "NO_TEA":
        kwargs["calibration"] = dict(calibration, teacache=None, teacache_unavailable="no adaLN")
    elif cal == "BAD_MAG":
        kwargs["calibration"] = dict(calibration, magcache={"mag_ratios": [1.0, float("inf")]})
    with pytest.raises(ValueError, match=match):
        BaselineConfig(**kwargs)


class _Plain(nn.Module):
    """A model whose heavy blocks are bare Linear layers (no adaLN)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_apply_errors(setup, calibration):
    dit, cond, noise = setup
    with pytest.raises(ValueError, match="leaves nothing to skip"):
        apply_baseline(dit, BaselineConfig("deepcache", steps=8, keep_last=CFG.depth), reference_layout(dit))
    toy = _Plain()
    layout = BlockLayout(heavy=list(toy.blocks), audio=[], audio_after=())
    with pytest.raises(LayoutError, match="teacache needs DiT-style heavy blocks.*adaLN_modulation"):
        apply_baseline(toy, _config("teacache", calibration), layout)
    with pytest.raises(LayoutError, match="fora needs"):
        apply_baseline(toy, _config("fora", calibration), layout)
    with apply_baseline(toy, BaselineConfig("fbcache", threshold=1e9), layout) as h:  # no adaLN needed
        x = torch.randn(2, 8)
        with torch.no_grad():
            outs = [toy(x) for _ in range(3)]
        assert h.stats()["decisions"] == "CRR" and torch.allclose(outs[2], outs[0], atol=1e-6)
    cal = calibrate_baselines(toy, layout, lambda: [toy(torch.randn(2, 8)) for _ in range(4)], steps=2, degree=1)
    assert cal["teacache"] is None and "adaLN_modulation" in cal["teacache_unavailable"]
    with pytest.raises(ValueError, match="cannot drive teacache"):
        BaselineConfig("teacache", steps=2, calibration=cal)
    with pytest.raises(ValueError, match="config must be a BaselineConfig"):
        apply_baseline(dit, {"method": "fora"}, reference_layout(dit))
