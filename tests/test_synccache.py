"""SyncCache: exactness when off/removed, reuse behaviour, audio always fresh, budgets, DP, errors."""
import json
import math
import random

import pytest
import torch

from engine.model.dit import PRESETS, AvatarDiT
from engine.sampler import timesteps
from synccache import (BlockLayout, LayoutError, Schedule, ScheduleError, SyncCacheConfig, apply_synccache,
                       brute_force, error_curve, plan, reference_layout, weighted_rel_l1)

from dit_inputs import random_setup

torch.set_num_threads(1)
CFG = PRESETS["ref-XS"]
STEPS = 6
BIG = SyncCacheConfig(threshold=1e9, warmup=1, max_reuse=100)  # reuse whenever allowed


@pytest.fixture(scope="module")
def setup():
    """A random-weight DiT, a chunk condition and noise."""
    return random_setup(CFG, seed=0)


@torch.no_grad()
def _euler(dit, cond, noise, steps=STEPS):
    """Euler loop as engine.sampler.sample; returns (final latent, per-step velocities)."""
    ts, x, vs = timesteps(steps), noise, []
    for i in range(steps):
        v = dit(x, ts[i].expand(x.shape[0]), cond)
        vs.append(v)
        x = x + (ts[i + 1] - ts[i]) * v
    return x, vs


@torch.no_grad()
def _manual_step(dit, cond, x, t, residuals=None):
    """One step by hand: each span computed (-> its residual) or, given residuals, bypassed by adding them;
    the audio blocks always run. -> (velocity, {span: residual})."""
    h, c = dit.embed(x, t, cond)
    rec = {}
    for s, (a, b) in enumerate(reference_layout(dit).spans()):
        inp = h
        if residuals is None:
            for i in range(a, b + 1):
                h = dit.blocks[i](h, c)
            rec[s] = h - inp
        else:
            h = h + residuals[s]
        h = dit.audio_step(dit.audio_slot[b], h, cond)
    return dit.head(h, c, cond), rec


def _hook_state(dit):
    mods = [dit, *dit.blocks, *dit.audio_blocks]
    return [(len(m._forward_pre_hooks), len(m._forward_hooks), "forward" in m.__dict__) for m in mods]


# --- exactness ------------------------------------------------------------------------------------
def test_disabled_is_bit_identical(setup):
    dit, cond, noise = setup
    plain, _ = _euler(dit, cond, noise)
    with apply_synccache(dit, SyncCacheConfig(enabled=False, threshold=1e9), reference_layout(dit)) as h:
        out, _ = _euler(dit, cond, noise)
        assert h.stats()["reuse_steps"] == 0 and h.stats()["mode"] == "off"
    assert torch.equal(out, plain)


def test_zero_threshold_computes_everything_exactly(setup):
    dit, cond, noise = setup
    plain, _ = _euler(dit, cond, noise)
    with apply_synccache(dit, SyncCacheConfig(threshold=0.0), reference_layout(dit)) as h:
        out, _ = _euler(dit, cond, noise)
        assert h.stats()["decisions"] == "C" * STEPS
    assert torch.equal(out, plain)


def test_remove_restores_exactly(setup):
    dit, cond, noise = setup
    before_hooks = _hook_state(dit)
    plain, _ = _euler(dit, cond, noise)
    h = apply_synccache(dit, BIG, reference_layout(dit))
    cached, _ = _euler(dit, cond, noise)
    assert not torch.equal(cached, plain)  # caching changed something while attached
    with pytest.raises(RuntimeError, match="already applied"):
        apply_synccache(dit, BIG, reference_layout(dit))
    h.remove()
    h.remove()  # idempotent
    assert _hook_state(dit) == before_hooks
    assert all(type(b).forward is b.forward.__func__ for b in dit.blocks)
    out, _ = _euler(dit, cond, noise)
    assert torch.equal(out, plain)


# --- reuse behaviour ------------------------------------------------------------------------------
def test_large_threshold_reuses_and_counts(setup):
    dit, cond, noise = setup
    layout = reference_layout(dit)
    with apply_synccache(dit, SyncCacheConfig(threshold=1e9, warmup=2, max_reuse=2), layout) as h:
        _euler(dit, cond, noise)
        s = h.stats()
        assert s["decisions"] == "CCRRCR"  # warmup 2, then at most 2 reuses in a row
        assert s["steps"] == STEPS and s["reuse_steps"] == 3 and s["computed_steps"] == 3
        assert s["cached_spans"] == [0, 1, 2, 3]
        assert s["spans"][0] == {"blocks": [0, 1], "cacheable": [1, 1], "cached": True, "computed": 3, "reused": 3,
                                    "crossed": 0}
        assert len(s["probe_error"]) == STEPS and s["probe_error"][0] is None
        assert all(e > 0 for e in s["probe_error"][1:])
        tokens = CFG.frames * CFG.tokens_per_frame + (1 + CFG.motion_frames) * CFG.tokens_per_frame
        assert s["cache_bytes"] == 4 * tokens * CFG.hidden * 4  # four float32 residuals [1, L, D]
        h.reset()
        assert h.stats()["steps"] == 0 and h.stats()["cache_bytes"] == 0
        _euler(dit, cond, noise, steps=3)
        assert h.stats()["decisions"] == "CCR"  # a fresh sample starts with computed steps again


def test_audio_always_runs_and_cached_heavy_blocks_do_not(setup):
    dit, cond, noise = setup
    calls = {}

    def counter(name):
        def hook(mod, args):
            calls[name] = calls.get(name, 0) + 1
        return hook
    hooks = [b.register_forward_pre_hook(counter(f"audio{i}")) for i, b in enumerate(dit.audio_blocks)]
    # count the work inside heavy blocks (their adaLN runs first), not calls to the (wrapped) block
    hooks += [b.adaLN_modulation.register_forward_pre_hook(counter(f"heavy{i}")) for i, b in enumerate(dit.blocks)]
    per_step = []
    try:
        with apply_synccache(dit, BIG, reference_layout(dit)) as h:
            ts, x = timesteps(STEPS), noise
            with torch.no_grad():
                for i in range(STEPS):
                    calls.clear()
                    x = x + (ts[i + 1] - ts[i]) * dit(x, ts[i].expand(1), cond)
                    per_step.append(dict(calls))
            s = h.stats()
    finally:
        for hk in hooks:
            hk.remove()
    assert s["decisions"] == "C" + "R" * (STEPS - 1)
    assert s["audio_calls"] == STEPS * len(CFG.audio_after)
    for step, c in enumerate(per_step):
        assert all(c.get(f"audio{i}") == 1 for i in range(len(CFG.audio_after))), (step, c)
        assert c.get("heavy0") == 1  # the probe always runs
        ran = sorted(int(k[5:]) for k in c if k.startswith("heavy"))
        assert ran == (list(range(CFG.depth)) if s["decisions"][step] == "C" else [0])


def test_reuse_step_adds_stored_residuals(setup):
    """Schedule mode (no probe): step 1 bypasses every span with output-input residuals of step 0."""
    dit, cond, noise = setup
    layout = reference_layout(dit)
    spans = layout.spans()
    sched = Schedule(reuse=[[0, 1, 0] for _ in spans], spans=[list(p) for p in spans])

    ts = timesteps(3)
    v0, res = _manual_step(dit, cond, noise, ts[0].expand(1))
    x1 = noise + (ts[1] - ts[0]) * v0
    v1, _ = _manual_step(dit, cond, x1, ts[1].expand(1), res)
    with apply_synccache(dit, SyncCacheConfig(schedule=sched), layout) as h:
        with torch.no_grad():
            w0 = dit(noise, ts[0].expand(1), cond)
            w1 = dit(x1, ts[1].expand(1), cond)
        s = h.stats()
    assert s["mode"] == "schedule" and s["decisions"] == "CR" and not s["probe_error"]
    assert torch.allclose(w0, v0, atol=1e-6) and torch.allclose(w1, v1, atol=1e-6)


def test_forecast_extrapolates_residuals_from_the_last_two_computed_steps(setup):
    """forecast=1: steps 0-2 computed, steps 3 and 4 add r2 + (t - 2) (r2 - r1); no slope from step 0 (pure
    noise), so a reuse right after steps 0 and 1 would add r1 as it is; memory doubles."""
    dit, cond, noise = setup
    layout = reference_layout(dit)
    spans = layout.spans()
    sched = Schedule(reuse=[[0, 0, 0, 1, 1] for _ in spans], spans=[list(p) for p in spans],
                     meta={"forecast": 1})

    ts = timesteps(5)
    xs, vs, res = [noise], [], []
    for k in range(5):
        t = ts[k].expand(1)
        if k < 3:
            v, r = _manual_step(dit, cond, xs[-1], t)
            res.append(r)
        else:
            v, _ = _manual_step(dit, cond, xs[-1], t, {s: res[2][s] + (k - 2) * (res[2][s] - res[1][s]) for s in res[2]})
        vs.append(v)
        xs.append(xs[-1] + (ts[k + 1] - ts[k]) * v)
    assert SyncCacheConfig(schedule=sched).forecast == 1  # taken from the schedule
    for forecast, want in ((1, vs), (0, None)):
        with apply_synccache(dit, SyncCacheConfig(schedule=sched, forecast=forecast), layout) as h:
            with torch.no_grad():
                got = [dit(xs[k], ts[k].expand(1), cond) for k in range(5)]
            s = h.stats()
        assert s["decisions"] == "CCCRR"
        if want is not None:
            assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))
            one = sum(r.numel() * r.element_size() for r in res[0].values())
            assert s["cache_bytes"] == 2 * one  # residual + slope per span
        else:  # plain reuse differs from the forecast on steps 3 and 4 only
            assert all(torch.equal(got[k], vs[k]) for k in range(3))
            assert not torch.allclose(got[3], vs[3], atol=1e-5)
    with pytest.raises(ValueError, match="forecast"):
        SyncCacheConfig(schedule=sched, forecast=2)
    early = Schedule(reuse=[[0, 0, 1, 1, 1] for _ in spans], spans=[list(p) for p in spans])
    outs = []
    for forecast in (0, 1):  # after steps 0 and 1 only: no slope (step 0 is pure noise), plain reuse
        with apply_synccache(dit, SyncCacheConfig(schedule=early, forecast=forecast), layout):
            with torch.no_grad():
                outs.append([dit(xs[k], ts[k].expand(1), cond) for k in range(5)])
    assert all(torch.equal(p, q) for p, q in zip(*outs))


def test_budget_is_never_exceeded(setup):
    dit, cond, noise = setup
    layout = reference_layout(dit)
    with apply_synccache(dit, SyncCacheConfig(threshold=1e9, warmup=1, max_reuse=100, cache_ratio=0.5),
                         layout) as h:
        _euler(dit, cond, noise)
        s = h.stats()
    assert s["cached_spans"] == [2, 3]  # half of the spans, the deepest
    assert [sp["reused"] for sp in s["spans"]] == [0, 0, STEPS - 1, STEPS - 1]
    one = s["cache_bytes"] // 2
    limit = int(1.5 * one)
    with apply_synccache(dit, SyncCacheConfig(threshold=1e9, warmup=1, max_reuse=100, cache_bytes=limit),
                         layout) as h:
        _euler(dit, cond, noise)
        s = h.stats()
    assert s["cached_spans"] == [3] and s["peak_cache_bytes"] <= limit and s["cache_bytes"] == one
    assert [sp["reused"] for sp in s["spans"]] == [0, 0, 0, STEPS - 1]
    with apply_synccache(dit, SyncCacheConfig(threshold=1e9, warmup=1, spans=(0, 1, 2),
                                              cache_bytes=100 * one), layout) as h:
        _euler(dit, cond, noise)
        assert h.stats()["cached_spans"] == [0, 1, 2] and h.stats()["cache_bytes"] == 3 * one
    with apply_synccache(dit, SyncCacheConfig(threshold=1e9, cache_bytes=one - 1), layout) as h:
        _euler(dit, cond, noise)
        s = h.stats()
    assert s["cached_spans"] == [] and s["peak_cache_bytes"] == 0 and s["reuse_steps"] == 0


def test_probe_weights_the_human_region():
    ref = torch.ones(1, 4, 8)
    cur = ref.clone()
    cur[0, 0] += 1.0  # only token 0 changed
    assert math.isclose(weighted_rel_l1(cur, ref), 0.25, rel_tol=1e-6)
    assert weighted_rel_l1(cur, ref, torch.tensor([[4.0, 1, 1, 1]])) > 0.5  # token 0 is the person
    assert weighted_rel_l1(cur, ref, torch.tensor([[0.0, 1, 1, 1]])) == 0.0
    with pytest.raises(ValueError, match="cache_ratio"):
        SyncCacheConfig(cache_ratio=1.5)


# --- layout ---------------------------------------------------------------------------------------
def test_reference_layout_spans_and_weight(setup):
    dit, cond, noise = setup
    layout = reference_layout(dit)
    assert layout.spans() == [(0, 1), (2, 3), (4, 5), (6, 7)]
    w = layout.human_weight((noise, torch.zeros(1), cond), {})
    n_ctx = cond.context.shape[1]
    assert w.shape == (1, n_ctx + cond.human_weight.shape[1])
    assert torch.equal(w[:, n_ctx:], cond.human_weight)
    assert torch.all(w[:, :n_ctx] == cond.human_weight.min())
    assert BlockLayout(heavy=dit.blocks, audio=dit.audio_blocks[:1], audio_after=(1,)).spans() == [(0, 1), (2, 7)]


def test_layout_errors(setup):
    dit, cond, noise = setup
    blocks, audio = list(dit.blocks), list(dit.audio_blocks)
    with pytest.raises(LayoutError, match="listed twice"):
        BlockLayout(heavy=blocks + blocks[:1], audio=audio, audio_after=CFG.audio_after)
    with pytest.raises(LayoutError, match="both heavy and audio"):
        BlockLayout(heavy=blocks, audio=audio[:3] + blocks[:1], audio_after=CFG.audio_after)
    with pytest.raises(LayoutError, match="after heavy block 8"):
        BlockLayout(heavy=blocks, audio=audio, audio_after=(1, 3, 5, 8))
    with pytest.raises(LayoutError, match="shape"):
        BlockLayout.check_weight(torch.ones(1, 7), torch.zeros(1, 112, CFG.hidden))
    bad = BlockLayout(heavy=blocks, audio=audio, audio_after=CFG.audio_after,
                      human_weight=lambda args, kwargs: args[2].human_weight)  # chunk tokens only: too short
    with apply_synccache(dit, SyncCacheConfig(), bad):
        with pytest.raises(LayoutError, match=r"human weight has shape \(1, 64\)"):
            _euler(dit, cond, noise, steps=2)
    other = AvatarDiT(CFG)
    with pytest.raises(LayoutError, match="not a submodule"):
        apply_synccache(other, SyncCacheConfig(), reference_layout(dit))


# --- schedule: DP and files -----------------------------------------------------------------------
def _check_plan(sched, err, max_spans, warmup, max_run):
    assert len(sched.cached_spans) <= max_spans
    for s, row in enumerate(sched.reuse):
        run = 0
        for t, r in enumerate(row):
            assert not r or (t >= max(warmup, 1) and math.isfinite(err[s][t]))
            run = run + 1 if r else 0
            assert max_run is None or run <= max_run
    assert math.isclose(sched.error, sum(err[s][t] for s, row in enumerate(sched.reuse)
                                         for t, r in enumerate(row) if r), abs_tol=1e-9)


def test_dp_matches_brute_force():
    rng = random.Random(0)
    for case in range(40):
        n_spans, steps = rng.randint(1, 3), rng.randint(2, 5)
        err = [[rng.choice([rng.random(), rng.random(), math.inf]) for _ in range(steps)] for _ in range(n_spans)]
        max_spans, warmup, max_run = rng.randint(0, n_spans), rng.randint(1, 2), rng.choice([None, 1, 2])
        kw = dict(warmup=warmup, max_run=max_run)
        curve = error_curve(err, max_spans, **kw)
        for k, (e, _) in curve.items():
            dp, bf = plan(err, max_spans, reuses=k, **kw), brute_force(err, max_spans, reuses=k, **kw)
            assert dp.reuse_count == bf.reuse_count == k
            assert math.isclose(dp.error, bf.error, abs_tol=1e-9) and math.isclose(dp.error, e, abs_tol=1e-9)
            _check_plan(dp, err, max_spans, warmup, max_run)
        assert all(k + 1 not in curve or curve[k][0] <= curve[k + 1][0] + 1e-12 for k in curve)
        bound = rng.random() * n_spans
        dp = plan(err, max_spans, error_bound=bound, **kw)
        bf = brute_force(err, max_spans, error_bound=bound, **kw)
        assert dp.reuse_count == bf.reuse_count and math.isclose(dp.error, bf.error, abs_tol=1e-9), case
        assert dp.error <= bound + 1e-9
        _check_plan(dp, err, max_spans, warmup, max_run)
    with pytest.raises(ScheduleError, match="cannot reuse"):
        plan([[0.1, 0.1]], 1, reuses=5)


def test_dp_with_errors_by_age_matches_brute_force():
    """Entries may be lists by residual age: a run of reuses is priced at each reuse's age."""
    rng = random.Random(1)
    for case in range(40):
        n_spans, steps = rng.randint(1, 3), rng.randint(2, 5)
        err = [[rng.choice([[rng.random() for _ in range(rng.randint(1, 3))], rng.random(), math.inf])
                for _ in range(steps)] for _ in range(n_spans)]
        max_spans, warmup, max_run = rng.randint(0, n_spans), 1, rng.choice([None, 2])
        kw = dict(warmup=warmup, max_run=max_run)
        for k, (e, _) in error_curve(err, max_spans, **kw).items():
            dp, bf = plan(err, max_spans, reuses=k, **kw), brute_force(err, max_spans, reuses=k, **kw)
            assert dp.reuse_count == bf.reuse_count == k
            assert math.isclose(dp.error, bf.error, abs_tol=1e-9) and math.isclose(dp.error, e, abs_tol=1e-9)
    # staleness: one-step errors alone would reuse steps 1-3 in a row; by age the plan alternates
    by_age = [[math.inf] + [[0.1, 1.0, 5.0]] * 4]
    best = plan(by_age, 1, reuses=2)
    assert best.error == pytest.approx(0.2) and not any(a and b for a, b in zip(best.reuse[0], best.reuse[0][1:]))
    with pytest.raises(ScheduleError, match="empty list"):
        plan([[0.1, []]], 1, reuses=1)


def test_schedule_json_round_trip_and_bad_files(tmp_path):
    sched = plan([[0.0, 0.1, 0.2, 0.1], [0.0, 0.3, 0.1, 0.1]], max_spans=1, error_bound=0.25,
                 spans=[[0, 1], [2, 3]])
    path = tmp_path / "s.json"
    sched.save(path)
    back = Schedule.load(path)
    assert back.reuse == sched.reuse and back.spans == [[0, 1], [2, 3]] and back.error == sched.error
    good = json.loads(path.read_text())

    def bad(mutate, match):
        d = json.loads(json.dumps(good))
        mutate(d)
        path.write_text(json.dumps(d))
        with pytest.raises(ScheduleError, match=match):
            Schedule.load(path)
    bad(lambda d: d.pop("reuse"), "no 'reuse' key")
    bad(lambda d: d.pop("version"), "no 'version' key")
    bad(lambda d: d.update(version=99), "unknown schedule version 99")
    bad(lambda d: d["reuse"][1].append(0), "reuse row 1 has 5 steps, expected 4")
    bad(lambda d: d.update(num_spans=3), "'num_spans'")
    bad(lambda d: d["reuse"][0].__setitem__(0, 1), "step 0")
    path.write_text("{not json")
    with pytest.raises(ScheduleError, match="not valid JSON"):
        Schedule.load(path)


def test_schedule_must_fit_layout(setup):
    dit, cond, noise = setup
    with pytest.raises(ScheduleError, match="3 spans"):
        apply_synccache(dit, SyncCacheConfig(schedule=Schedule(reuse=[[0, 1]] * 3)), reference_layout(dit))


def test_share_guidance_runs_heavy_blocks_once_per_guidance_pair(setup):
    """share_guidance on a guidance pair [with audio; null audio]: each heavy block runs on the first half only
    and both halves get its residual (done by hand below), the audio blocks see both halves, the null half is
    not a copy; an unguided call (a batch of two sessions) is untouched."""
    dit, _, noise = setup
    cfg, g = dit.cfg, torch.Generator().manual_seed(1)
    ref = torch.randn(1, cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=g)
    mot = torch.randn(1, cfg.motion_frames, cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=g)
    audio = torch.randn(1, cfg.audio_frames * 2, cfg.audio_dim, generator=g)
    mask = torch.zeros(1, 128, 128)
    mask[:, 60:100, 40:90] = 1
    pair = dit.prepare(ref, mot, audio, mask, mask, null_audio=True)
    two = dit.prepare(torch.cat([ref, ref]), torch.cat([mot, mot]), torch.cat([audio, -audio]),
                      torch.cat([mask, mask]), torch.cat([mask, mask]))  # two sessions, no guidance
    x, t = torch.cat([noise, noise]), timesteps(3)[0].expand(2)
    with torch.no_grad():
        h, c = dit.embed(x, t, pair)
        for idx, blk in enumerate(dit.blocks):
            r = blk(h[:1], c[:1]) - h[:1]
            h = h + torch.cat([r, r])
            if idx in dit.audio_slot:
                h = dit.audio_step(dit.audio_slot[idx], h, pair)
        want, plain, plain_two = dit.head(h, c, pair), dit(x, t, pair), dit(x, t, two)
    layout = reference_layout(dit)
    sched = Schedule(reuse=[[0, 1, 0] for _ in layout.spans()], spans=[list(p) for p in layout.spans()])
    seen = []
    hook = dit.blocks[5].attn.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    try:
        with apply_synccache(dit, SyncCacheConfig(schedule=sched, share_guidance=True), layout) as hd:
            with torch.no_grad():
                got = dit(x, t, pair)
                stats = hd.stats()
                hd.reset()  # step 0 again: computed
                got_two = dit(x, t, two)
    finally:
        hook.remove()
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, plain, atol=1e-4)
    assert not torch.allclose(got[:1], got[1:], atol=1e-4)  # the audio blocks still tell the halves apart
    assert seen == [1, 2] and stats["shared_steps"] == 1
    assert torch.equal(got_two, plain_two)
    bare = BlockLayout(heavy=layout.heavy, audio=layout.audio, audio_after=layout.audio_after)
    with pytest.raises(LayoutError, match="guidance_pair"):
        apply_synccache(dit, SyncCacheConfig(schedule=sched, share_guidance=True), bare)
