"""SyncCache on the real Wan2.2-S2V class (diffsynth's WanS2VModel, a tiny random config): exactness,
skipped heavy blocks with fresh audio, schedules and budgets, CFG branches, the pipeline's model_fn.

The class and `model_fn_wans2v` come from the installed diffsynth (`[wan]` extra) through
engine.wan_s2v.model_code(), which reads them without importing torchvision (see its docstring).
"""
import os

import pytest
import torch

from synccache import LayoutError, Schedule, ScheduleError, SyncCacheConfig
from synccache import wan_s2v
from synccache.calibrate import SpanErrorRecorder
from synccache.schedule import plan

torch.set_num_threads(1)
STEPS = 6
S2V_DIM = 48  # S2V_TINY's dim
C, F, H, W = 16, 2, 8, 8  # latents [1, 16, 1 + F, 8, 8]: 16 tokens per frame with 1x2x2 patches


@pytest.fixture(scope="module")
def code():
    from engine.wan_s2v import WanS2VError, model_code
    try:
        return model_code()
    except WanS2VError as e:
        if os.environ.get("CI"):
            pytest.fail(f"{e} (CI is set: make test installs the [wan] extra)")
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def dit(code):
    from engine.wan_s2v import S2V_TINY
    torch.manual_seed(0)
    return code.WanS2VModel(**S2V_TINY).eval()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(latents=torch.randn(1, C, 1 + F, H, W, generator=g), context=torch.randn(1, 5, 32, generator=g),
                audio=torch.randn(1, 25, 16, 4 * F, generator=g),
                motion_latents=torch.randn(1, C, 19, H, W, generator=g))


def _schedule(steps=STEPS, spans=4, reuse_from=2, every=3):
    """Reuse every span on all steps >= reuse_from except every `every`-th (a computed step)."""
    row = [t >= reuse_from and t % every != 0 for t in range(steps)]
    return Schedule(reuse=[row] * spans)


@torch.no_grad()
def _sample_forward(dit, inp, steps=STEPS, audio=None, handle=None, guidance=1.0):
    """Euler loop through the official-style forward (t: 1000 -> 0); CFG as two calls per step."""
    x = inp["latents"].clone()
    a = inp["audio"] if audio is None else audio
    ts = torch.linspace(1000.0, 0.0, steps + 1)
    for i in range(steps):
        t = ts[i:i + 1]
        v = dit(x, t, inp["context"], a, inp["motion_latents"], None)
        if guidance != 1.0:
            vn = dit(x, t, inp["context"], 0 * a, inp["motion_latents"], None)
            v = vn + guidance * (v - vn)
        x = x + (ts[i + 1] - ts[i]) / 1000 * v
        x[:, :, :1] = inp["latents"][:, :, :1]  # the reference frame stays clean
    return x


@torch.no_grad()
def _sample_fn(step, dit, inp, steps=STEPS, guidance=1.0):
    """The pipeline's loop: model_fn(dit=..., **inputs, positive=...) per pass, as WanVideoPipeline does."""
    x = inp["latents"].clone()
    ts = torch.linspace(1000.0, 0.0, steps + 1)
    shared = dict(dit=dit, context=inp["context"], motion_latents=inp["motion_latents"],
                  s2v_pose_latents=None, drop_motion_frames=False)
    for i in range(steps):
        t = ts[i:i + 1]
        v = step(latents=x, timestep=t, audio_embeds=inp["audio"], positive=True, **shared)
        if guidance != 1.0:
            vn = step(latents=x, timestep=t, audio_embeds=0 * inp["audio"], positive=False, **shared)
            v = vn + guidance * (v - vn)
        x = x + (ts[i + 1] - ts[i]) / 1000 * v
        x[:, :, :1] = inp["latents"][:, :, :1]
    return x


def _fn(code):
    """model_fn_wans2v taking the pipeline's keyword `positive` (model_fn_wan_video swallows it)."""
    def fn(positive=True, **kw):
        return code.model_fn_wans2v(**kw)
    return fn


def _hook_state(model):
    return [(len(m._forward_pre_hooks), len(m._forward_hooks), "forward" in m.__dict__) for m in model.modules()]


# --- layout -------------------------------------------------------------------------------------------
def test_layout_of_the_real_class(dit):
    lay = wan_s2v.layout(dit)
    assert lay.audio_after == (0, 2, 3) and len(lay.heavy) == 4
    assert lay.spans() == [(0, 0), (1, 2), (3, 3)]
    assert [type(m).__name__ for m in lay.audio] == ["CrossAttention"] * 3


def test_14b_layout_from_the_class_default(code):
    """The 14B's injection points come from the class default, built on the meta device (no memory)."""
    from engine.wan_s2v import S2V_14B
    with torch.device("meta"):
        big = code.WanS2VModel(**S2V_14B)
    lay = wan_s2v.layout(big)
    assert lay.audio_after == (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    assert len(lay.spans()) == 12 and lay.spans()[1] == (1, 4) and lay.spans()[-1] == (37, 39)


def test_not_a_wan_model_or_bad_mask_is_one_clear_error(dit):
    with pytest.raises(LayoutError, match="not a diffsynth WanS2VModel"):
        wan_s2v.layout(torch.nn.Linear(2, 2))
    with pytest.raises(LayoutError, match="person_mask must be a tensor"):
        wan_s2v.layout(dit, person_mask=torch.ones(2, 2, 2, 2))
    lay = wan_s2v.layout(dit, person_mask=torch.ones(3, 8, 8))  # 3 frames for a 2-frame step
    with pytest.raises(LayoutError, match="person_mask has 3 frames"):
        lay.human_weight((), _inputs())


def test_person_mask_weights_tokens_and_output(dit):
    mask = torch.zeros(32, 32)
    mask[8:24, 0:16] = 1  # left half of the middle rows, at 4x the latent resolution
    lay = wan_s2v.layout(dit, person_mask=mask)
    kw = dict(latents=_inputs()["latents"])
    w = lay.human_weight((), kw)  # [1, F*4*4 + 4*4]: noisy video then reference tokens
    assert w.shape == (1, F * 16 + 16)
    grid = w[0, :16].view(4, 4)  # first frame on the 4x4 token grid
    assert torch.allclose(grid[1:3, 0:2], torch.full((2, 2), 1.2)) and torch.allclose(grid[0], torch.full((4,), 0.2))
    assert torch.equal(w[0, :16], w[0, 16:32]) and torch.equal(w[0, :16], w[0, -16:])
    ow = lay.output_weight((), kw)
    assert ow.shape == (1, 1, 1 + F, H, W) and float(ow.max()) == pytest.approx(1.2)
    hidden = torch.zeros(1, F * 16 + 16 + 24, 48)  # + 24 motion tokens
    full = lay.weight((), kw, hidden)
    assert full.shape == (1, hidden.shape[1]) and torch.all(full[0, -24:] == 0.2)


# --- exactness ----------------------------------------------------------------------------------------
def test_disabled_and_removed_are_bit_identical(dit, code):
    inp = _inputs()
    plain_f = _sample_forward(dit, inp)
    step_plain = wan_s2v.WanS2VStep(dit, code.model_fn_wans2v)
    plain_fn = _sample_fn(lambda **kw: step_plain(**{k: v for k, v in kw.items() if k != "positive"}), dit, inp)
    before = _hook_state(dit)
    h = wan_s2v.apply(dit, SyncCacheConfig(enabled=False))
    assert torch.equal(_sample_forward(dit, inp), plain_f)
    h.remove()
    h = wan_s2v.apply(dit, SyncCacheConfig(schedule=_schedule(spans=3)))
    assert not torch.equal(_sample_forward(dit, inp), plain_f)  # the cache did change something
    h.remove()
    assert _hook_state(dit) == before and torch.equal(_sample_forward(dit, inp), plain_f)
    step = wan_s2v.WanS2VStep(dit, _fn(code))
    h = wan_s2v.apply_step(step, SyncCacheConfig(enabled=False))
    assert torch.equal(_sample_fn(step, dit, inp), plain_fn)
    h.remove()
    assert _hook_state(dit) == before and torch.equal(_sample_fn(step, dit, inp), plain_fn)


@pytest.mark.parametrize("path", ["forward", "model_fn"])
def test_reuse_skips_heavy_blocks_and_runs_every_injection_fresh(dit, code, path):
    """On reuse steps no heavy block computes, and every injection runs, reading a hidden state that is
    new on every step (not a stale copy)."""
    inp = _inputs()
    calls, runs = [0] * 4, [0] * 4  # block called (by the model) / block computed (its self-attention ran)
    seen = []  # (injector, hidden state the injection reads)
    hooks = [b.register_forward_pre_hook(lambda m, a, _i=i: calls.__setitem__(_i, calls[_i] + 1))
             for i, b in enumerate(dit.blocks)]
    hooks += [b.self_attn.register_forward_pre_hook(lambda m, a, _i=i: runs.__setitem__(_i, runs[_i] + 1))
              for i, b in enumerate(dit.blocks)]
    hooks += [dit.audio_injector.injector_adain_layers[j].register_forward_pre_hook(
        lambda m, a, _j=j: seen.append((_j, a[0].clone()))) for j in range(3)]
    sched = _schedule(spans=3)
    step = wan_s2v.WanS2VStep(dit, _fn(code))
    try:
        h = (wan_s2v.apply(dit, SyncCacheConfig(schedule=sched)) if path == "forward"
             else wan_s2v.apply_step(step, SyncCacheConfig(schedule=sched)))
        x = _sample_forward(dit, inp) if path == "forward" else _sample_fn(step, dit, inp)
        st = h.stats()
        h.remove()
    finally:
        for hk in hooks:
            hk.remove()
    reused = [t for t in range(STEPS) if sched.reuse[0][t]]
    assert st["reuse_steps"] == len(reused) > 0 and st["decisions"].count("R") == len(reused)
    assert calls == [STEPS] * 4  # the model calls every block on every step ...
    assert runs == [STEPS - len(reused)] * 4  # ... none of them computes on a reuse step
    assert st["audio_calls"] == 3 * STEPS and [j for j, _ in seen] == [0, 1, 2] * STEPS
    # injections read different hidden states on consecutive reuse steps: not a stale copy
    by_step = [seen[3 * t:3 * t + 3] for t in range(STEPS)]
    for t in reused[1:]:
        if t - 1 in reused:
            assert all(not torch.equal(a, b) for (_, a), (_, b) in zip(by_step[t], by_step[t - 1]))
    assert torch.isfinite(x).all()


def test_reuse_steps_still_hear_new_audio(dit, code):
    """Same schedule, audio changed: outputs differ while the heavy-block work is the same."""
    inp = _inputs()
    sched = Schedule(reuse=[[t >= 1 for t in range(STEPS)]] * 3)  # compute only step 0
    outs, stats = [], []
    for audio in (inp["audio"], inp["audio"].flip(-1)):
        h = wan_s2v.apply(dit, SyncCacheConfig(schedule=sched))
        outs.append(_sample_forward(dit, inp, audio=audio))
        stats.append(h.stats())
        h.remove()
    assert stats[0]["computed_steps"] == stats[1]["computed_steps"] == 1
    assert not torch.allclose(outs[0], outs[1])


# --- schedules and budgets ----------------------------------------------------------------------------
def test_schedules_load_and_respect_the_byte_budget(dit, tmp_path):
    inp = _inputs()
    sched = _schedule(spans=3)
    sched.spans = [list(p) for p in wan_s2v.layout(dit).spans()]
    path = tmp_path / "wan.json"
    sched.save(path)
    one_span = (F + 1) * 16 + 24  # tokens with motion frames: residual of one span, fp32
    for budget in (None, one_span * 48 * 4, one_span * 48 * 4 * 2, 0):
        h = wan_s2v.apply(dit, SyncCacheConfig(schedule=path, cache_bytes=budget))
        _sample_forward(dit, dict(inp), guidance=3.0)  # two branches share the budget
        st = h.stats()
        h.remove()
        if budget is not None:
            assert st["peak_cache_bytes"] <= budget
        assert (st["reuse_steps"] > 0) == (budget != 0)
    bad = Schedule(reuse=[[False, True]] * 3, spans=[[0, 0], [1, 1], [2, 3]])
    with pytest.raises(ScheduleError, match="spans"):
        wan_s2v.apply(dit, SyncCacheConfig(schedule=bad))
    with pytest.raises(ScheduleError, match="4 spans"):
        wan_s2v.apply(dit, SyncCacheConfig(schedule=Schedule(reuse=[[False, True]] * 4)))


# --- classifier-free guidance -------------------------------------------------------------------------
def test_cfg_passes_keep_their_own_cache_state(dit):
    """forward path: interleaved positive/negative passes under one handle == each pass cached on its
    own (two handles on two copies of the model); the branch comes from the all-zero negative audio."""
    import copy
    inp, sched = _inputs(), _schedule(spans=3)
    h = wan_s2v.apply(dit, SyncCacheConfig(schedule=sched))
    got = _sample_forward(dit, inp, guidance=3.0)
    assert sorted(h.stats()["branches"]) == ["negative", "positive"]
    h.remove()
    dit_b = copy.deepcopy(dit)
    hp, hn = wan_s2v.apply(dit, SyncCacheConfig(schedule=sched)), wan_s2v.apply(dit_b, SyncCacheConfig(schedule=sched))
    x = inp["latents"].clone()
    ts = torch.linspace(1000.0, 0.0, STEPS + 1)
    with torch.no_grad():
        for i in range(STEPS):
            t = ts[i:i + 1]
            v = dit(x, t, inp["context"], inp["audio"], inp["motion_latents"], None)
            vn = dit_b(x, t, inp["context"], 0 * inp["audio"], inp["motion_latents"], None)
            x = x + (ts[i + 1] - ts[i]) / 1000 * (vn + 3.0 * (v - vn))
            x[:, :, :1] = inp["latents"][:, :, :1]
    hp.remove()
    hn.remove()
    assert torch.equal(got, x)
    # an explicit branch overrides the layout's guess
    h = wan_s2v.apply(dit, SyncCacheConfig(schedule=sched))
    with torch.no_grad(), h.branch("mine"):
        dit(inp["latents"], torch.tensor([1000.0]), inp["context"], inp["audio"], inp["motion_latents"], None)
    assert h.stats()["branches"] == ["mine"]
    h.remove()


def test_cfg_branches_apart_through_model_fn(dit, code):
    """model_fn path: the cached guided run equals positive and negative passes cached separately."""
    import copy
    inp, sched = _inputs(), _schedule(spans=3)
    step = wan_s2v.WanS2VStep(dit, _fn(code))
    h = wan_s2v.apply_step(step, SyncCacheConfig(schedule=sched))
    got = _sample_fn(step, dit, inp, guidance=3.0)
    h.remove()
    dit_b = copy.deepcopy(dit)
    sp, sn = wan_s2v.WanS2VStep(dit, _fn(code)), wan_s2v.WanS2VStep(dit_b, _fn(code))
    hp, hn = wan_s2v.apply_step(sp, SyncCacheConfig(schedule=sched)), wan_s2v.apply_step(sn, SyncCacheConfig(schedule=sched))
    x = inp["latents"].clone()
    ts = torch.linspace(1000.0, 0.0, STEPS + 1)
    shared = dict(context=inp["context"], motion_latents=inp["motion_latents"], s2v_pose_latents=None,
                  drop_motion_frames=False)
    with torch.no_grad():
        for i in range(STEPS):
            t = ts[i:i + 1]
            v = sp(dit=dit, latents=x, timestep=t, audio_embeds=inp["audio"], **shared)
            vn = sn(dit=dit_b, latents=x, timestep=t, audio_embeds=0 * inp["audio"], **shared)
            x = x + (ts[i + 1] - ts[i]) / 1000 * (vn + 3.0 * (v - vn))
            x[:, :, :1] = inp["latents"][:, :, :1]
    hp.remove()
    hn.remove()
    assert torch.equal(got, x)
    # and the branches matter: one shared state (every call one branch) gives another result
    h = wan_s2v.apply_step(step, SyncCacheConfig(schedule=sched))
    h.layout.branch = None
    mixed = _sample_fn(step, dit, inp, guidance=3.0)
    h.remove()
    assert not torch.equal(mixed, got)


# --- the pipeline -------------------------------------------------------------------------------------
class _FakePipeline:
    """What apply_to_pipeline touches of a diffsynth WanVideoPipeline: .dit and .model_fn(**kwargs),
    called per step with the positive inputs and then the negative ones, as WanVideoPipeline.__call__."""

    def __init__(self, dit, fn):
        self.dit, self.model_fn = dit, fn

    @torch.no_grad()
    def __call__(self, inp, steps=STEPS, cfg_scale=3.0):
        x = inp["latents"].clone()
        ts = torch.linspace(1000.0, 0.0, steps + 1)
        shared = dict(context=inp["context"], motion_latents=inp["motion_latents"], s2v_pose_latents=None,
                      drop_motion_frames=False)
        for i in range(steps):
            t = ts[i:i + 1]
            v = self.model_fn(dit=self.dit, latents=x, timestep=t, audio_embeds=inp["audio"], positive=True,
                              **shared)
            vn = self.model_fn(dit=self.dit, latents=x, timestep=t, audio_embeds=0 * inp["audio"],
                               positive=False, **shared)
            x = x + (ts[i + 1] - ts[i]) / 1000 * (vn + cfg_scale * (v - vn))
            x[:, :, :1] = inp["latents"][:, :, :1]
        return x


def test_apply_to_pipeline_one_call_resets_per_call_and_removes(dit, code):
    pipe = _FakePipeline(dit, _fn(code))
    fn, inp = pipe.model_fn, _inputs()
    plain = pipe(inp)
    handle = wan_s2v.apply_to_pipeline(pipe, SyncCacheConfig(schedule=_schedule(spans=3)))
    assert isinstance(pipe.model_fn, wan_s2v.WanS2VStep)
    with pytest.raises(RuntimeError, match="already applied"):
        wan_s2v.apply_to_pipeline(pipe)
    first, second = pipe(inp), pipe(inp)  # the second call starts a new sample: same result
    assert torch.equal(first, second) and not torch.equal(first, plain)
    st = handle.stats()
    assert st["steps"] == 2 * 2 * STEPS and sorted(st["branches"]) == ["negative", "positive"]
    handle.remove()
    assert pipe.model_fn is fn and torch.equal(pipe(inp), plain)
    with pytest.raises(LayoutError, match="not a diffsynth WanVideoPipeline"):
        wan_s2v.apply_to_pipeline(object())


# --- calibration --------------------------------------------------------------------------------------
def test_calibration_records_both_branches_and_plans(dit, code):
    """The recorder on the pipeline's step: errors for every span and step, a DP plan that applies."""
    pipe = _FakePipeline(dit, _fn(code))
    step = wan_s2v.WanS2VStep(dit, pipe.model_fn)
    pipe.model_fn = step
    mask = torch.zeros(8, 8)
    mask[2:6, 2:6] = 1
    lay = wan_s2v.layout(dit, person_mask=mask)
    with SpanErrorRecorder(step, lay, max_age=2) as rec:
        for seed in (1, 2):
            rec.reset()
            pipe(_inputs(seed))
    err = rec.errors()
    assert rec.samples() == 4  # 2 clips x 2 branches
    assert rec.weighted_steps > 0 and rec.uniform_steps == 0
    assert len(err) == 3 and all(len(r) == STEPS for r in err)
    assert all(r[0] == float("inf") for r in err) and all(0 <= v < float("inf") for r in err for v in r[1:])
    sched = plan(rec.errors_by_age(), max_spans=3, reuses=6, spans=lay.spans())
    pipe.model_fn = pipe.model_fn.fn
    handle = wan_s2v.apply_to_pipeline(pipe, SyncCacheConfig(schedule=sched))
    pipe(_inputs(3))
    assert handle.stats()["reuse_steps"] == 2 * sum(any(r[t] for r in sched.reuse) for t in range(STEPS))
    handle.remove()


# --- cost and the user's path -------------------------------------------------------------------------
def test_flops_split_by_part_follow_the_config(code):
    """FLOPs on the meta device: the heavy part grows with the blocks, the audio part with the injections."""
    from engine.wan_s2v import S2V_14B, computed_fraction, speedup_ceiling, step_flops, stretch
    small = dict(S2V_14B, num_layers=8, audio_inject_layers=[0, 4])
    base = step_flops(small, height=64, width=64, frames=8)["flops"]
    deeper = step_flops(dict(small, num_layers=16), height=64, width=64, frames=8)["flops"]
    more_audio = step_flops(dict(small, audio_inject_layers=[0, 2, 4, 6]), height=64, width=64, frames=8)["flops"]
    assert deeper["heavy"] == 2 * base["heavy"] and deeper["audio"] == base["audio"]
    assert more_audio["audio"] == 2 * base["audio"] and more_audio["heavy"] == base["heavy"]
    assert base["total"] == sum(base[k] for k in ("heavy", "audio", "audio_encoder", "rest"))
    assert speedup_ceiling(base, 1.0) == pytest.approx(1.0)
    assert speedup_ceiling(base, 0.0) == pytest.approx(base["total"] / (base["total"] - base["heavy"]))
    sched = Schedule(reuse=[[False, True, True, False]] * 2)  # 2 spans, 4 steps: half the steps computed
    spans = [(0, 0), (1, 4), (5, 8), (9, 11)]
    wide = stretch(sched, 8, spans)
    assert wide.steps == 8 and wide.num_spans == 4 and wide.reuse[0][0] is False
    assert all(row == [False, False, True, True, True, True, False, False] for row in wide.reuse)
    assert computed_fraction(Schedule(reuse=[[False] * 8] * 4, spans=[list(p) for p in spans]), spans) == 1.0


def _run_cli(argv, capsys):
    from syncavatar.cli import main
    rc = main(argv)
    return rc, capsys.readouterr()


def test_bench_wan_reports_parts_and_ceilings(code, tmp_path, capsys):
    out = tmp_path / "cost.json"
    rc, io = _run_cli(["bench", "wan", "--height", "64", "--width", "64", "--frames", "8",
                       "--json", str(out)], capsys)
    assert rc == 0 and "speedup ceiling" in io.out
    import json
    r = json.loads(out.read_text())
    assert set(r["flops"]) == {"heavy", "audio", "audio_encoder", "rest", "total"}
    assert set(r["schedules"]) == {"default", "live"} and r["per_step_flops"] == 2 * r["flops"]["total"]
    for s in r["schedules"].values():
        assert 0 < s["computed_fraction"] < 1 and s["speedup_ceiling"] > 1


def test_calibrate_wan_errors_name_what_is_missing(code, tmp_path, capsys):
    rc, io = _run_cli(["calibrate", "--wan-s2v", str(tmp_path / "none")], capsys)
    assert rc == 2 and "does not exist" in io.err and len(io.err.strip().splitlines()) == 1
    folder = tmp_path / "wan"
    folder.mkdir()
    rc, io = _run_cli(["calibrate", "--wan-s2v", str(folder)], capsys)
    assert rc == 2 and len(io.err.strip().splitlines()) == 1
    for part in ("DiT", "audio encoder", "audio processor", "text encoder", "tokenizer", "VAE"):
        assert part in io.err
    (folder / "wav2vec2-large-xlsr-53-english").mkdir()
    (folder / "google" / "umt5-xxl").mkdir(parents=True)
    for name in ("diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors",
                 "wav2vec2-large-xlsr-53-english/model.safetensors", "models_t5_umt5-xxl-enc-bf16.pth",
                 "Wan2.1_VAE.pth"):
        (folder / name).write_bytes(b"")
    rc, io = _run_cli(["calibrate", "--wan-s2v", str(folder), "--image", str(tmp_path / "p.png")], capsys)
    assert rc == 2 and "--audio None is not a file" in io.err
    wav, png = tmp_path / "a.wav", tmp_path / "p.png"
    wav.write_bytes(b"")
    png.write_bytes(b"")
    rc, io = _run_cli(["calibrate", "--wan-s2v", str(folder), "--audio", str(wav), "--image", str(png),
                       "--device", "cpu"], capsys)
    assert rc == 2 and "runs on a CUDA GPU" in io.err and len(io.err.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        rc, io = _run_cli(["calibrate", "--wan-s2v", str(folder), "--audio", str(wav), "--image", str(png)], capsys)
        assert rc == 2 and "no CUDA GPU" in io.err


# --- the generator backend ----------------------------------------------------------------------------
class _RecordingPipeline:
    """Stands in for WanVideoPipeline.__call__ (no weights): records what each chunk is given and returns
    num_frames frames whose value encodes the call number, through the real DiT's model_fn when asked."""

    def __init__(self, dit=None, fn=None):
        self.calls, self.dit, self.model_fn = [], dit, fn

    def __call__(self, **kw):
        self.calls.append(kw)
        n, h, w = kw["num_frames"], kw["height"], kw["width"]
        if self.dit is not None:  # run the real model's steps so a cache has something to do
            inp = _inputs(len(self.calls))
            _FakePipeline(self.dit, self.model_fn)(inp, steps=kw["num_inference_steps"])
        video = torch.linspace(-1, 1, n).view(1, 1, n, 1, 1).expand(1, 3, n, h, w).clone()
        return video + 0 * len(self.calls)


def test_wan_generator_windows_audio_carries_motion_and_renders(tmp_path):
    from PIL import Image

    from engine.generator import render_with
    from engine.wan_s2v import WanS2VGenerator
    pipe = _RecordingPipeline()
    gen = WanS2VGenerator(pipe, Image.new("RGB", (64, 48)), steps=3, infer_frames=8, motion_frames=6,
                          height=32, width=48)
    audio = torch.arange(16000 * 2, dtype=torch.float32).numpy()  # 2 s: 32 frames at 16 fps = 4 chunks
    frames, stats = render_with(gen, audio)
    assert frames.shape == (32, 32, 48, 3) and frames.dtype.name == "uint8"
    assert stats["fps"] == 16 and stats["chunks"] == 4 and stats["computed_steps"] == 4 * 3
    per_chunk = 16000 * 8 // 16
    for c, kw in enumerate(pipe.calls):
        assert kw["num_frames"] == 9 and kw["num_inference_steps"] == 3 and kw["audio_sample_rate"] == 16000
        assert kw["input_audio"][0] == c * per_chunk and len(kw["input_audio"]) == per_chunk
        assert kw["input_image"].size == (48, 32)
    assert pipe.calls[0]["motion_video"] is None
    for kw in pipe.calls[1:]:  # the last motion_frames frames generated so far
        assert kw["motion_video"].shape == (1, 3, 6, 32, 48)
    first = torch.linspace(-1, 1, 9)[-8:][3:]  # chunk 0 without its first 3 frames: 5, padded to 6
    assert torch.allclose(pipe.calls[1]["motion_video"][0, 0, :, 0, 0], torch.cat([first[:1], first]))
    assert torch.allclose(pipe.calls[2]["motion_video"][0, 0, :, 0, 0], torch.linspace(-1, 1, 9)[-6:])
    assert frames[0, 0, 0, 0] == 32 and frames[7, 0, 0, 0] == 255  # [-1, 1] -> [0, 255]: -0.75 -> 32
    short = torch.zeros(16000 // 4).numpy()  # 0.25 s: one chunk, its audio padded with zeros
    gen.reset()
    frames, _ = render_with(gen, short)
    assert frames.shape[0] == 4 and len(pipe.calls[-1]["input_audio"]) == per_chunk


def test_wan_generator_with_synccache_on_the_real_model(dit, code):
    """The backend applies SyncCache to the pipeline and removes it on close."""
    from PIL import Image

    from engine.generator import render_with
    from engine.wan_s2v import WanS2VGenerator
    pipe = _RecordingPipeline(dit, _fn(code))
    fn = pipe.model_fn
    gen = WanS2VGenerator(pipe, Image.new("RGB", (8, 8)), steps=STEPS, infer_frames=4, height=8, width=8,
                          cache=SyncCacheConfig(schedule=_schedule(spans=3)))
    assert isinstance(pipe.model_fn, wan_s2v.WanS2VStep)
    _, stats = render_with(gen, torch.zeros(16000 // 2).numpy())  # 8 frames: 2 chunks
    assert stats["reused_steps"] > 0 and stats["computed_steps"] + stats["reused_steps"] == 2 * 2 * STEPS
    assert pipe.model_fn is fn


def test_render_wan_errors_are_one_line(code, tmp_path, capsys):
    wav = tmp_path / "a.wav"
    from engine.media import save_wav
    import numpy as np
    save_wav(wav, np.zeros(1600, np.float32))
    rc, io = _run_cli(["render", "--wan-s2v", str(tmp_path / "none"), "--audio", str(wav), "--out",
                       str(tmp_path / "o.mp4")], capsys)
    assert rc == 2 and "does not exist" in io.err and len(io.err.strip().splitlines()) == 1
    rc, io = _run_cli(["render", "--wan-s2v", str(tmp_path), "--audio", str(wav), "--out", str(tmp_path / "o.mp4"),
                       "--cache", "teacache"], capsys)
    assert rc == 2 and "not available on Wan2.2-S2V" in io.err


def test_audio_injection_exports_to_onnx_and_matches_after_transformer_block(dit, tmp_path):
    """engine/audio_path.py's export on the real class: one injection (adaLN + cross-attention) run by ONNX
    Runtime equals the residual WanS2VModel.after_transformer_block adds, over two frame counts."""
    import copy

    import numpy as np
    ort = pytest.importorskip("onnxruntime")
    from engine.wan_s2v import export_injection, injection_inputs
    dit = copy.deepcopy(dit)
    torch.manual_seed(3)
    for p in dit.audio_injector.parameters():  # random, not the zero-initialised outputs: a real comparison
        torch.nn.init.normal_(p, std=0.2)
    seen, orig = [], dit.after_transformer_block

    def spy(block_idx, hidden_states, audio_emb_global, audio_emb, original_seq_len, *a, **k):
        before = hidden_states.clone()
        out = orig(block_idx, hidden_states, audio_emb_global, audio_emb, original_seq_len, *a, **k)
        if block_idx in dit.audio_injector.injected_block_id:
            seen.append((dit.audio_injector.injected_block_id[block_idx], before, audio_emb_global, audio_emb,
                         original_seq_len, out.clone()))
        return out
    dit.after_transformer_block = spy
    session = None
    for frames in (2, 3):
        inp = _inputs()
        g = torch.Generator().manual_seed(frames)
        inp["latents"] = torch.randn(1, C, 1 + frames, H, W, generator=g)
        inp["audio"] = torch.randn(1, 25, 16, 4 * frames, generator=g)
        seen.clear()
        with torch.no_grad():
            dit(inp["latents"], torch.tensor([500.0]), inp["context"], inp["audio"], inp["motion_latents"], None)
        i, before, glob, emb, n, after = seen[1]  # the second injection (after block 2)
        example = injection_inputs(before, glob, emb, n)
        if session is None:  # exported once, at the first frame count; the second checks the dynamic axes
            entry = export_injection(dit, i, tmp_path, example)
            assert entry["inputs"]["hidden"] == ["frames", "tokens", S2V_DIM]
            session = ort.InferenceSession(str(tmp_path / entry["file"]), providers=["CPUExecutionProvider"])
        got = session.run(None, dict(zip(("hidden", "temb", "audio"), (e.numpy() for e in example))))[0]
        want = (after - before)[:, :n].reshape(got.shape).numpy()
        assert np.abs(want).max() > 0.1
        assert np.abs(got - want).max() <= 1e-4
