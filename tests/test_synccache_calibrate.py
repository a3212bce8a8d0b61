"""Calibration (span reuse errors, weighted towards the mouth), the streaming extension (cross-chunk reuse)
and method selection."""
import math

import numpy as np
import pytest
import torch

from engine.calibrate import add_cross, parse_budget
from engine.caching import cache_config, cache_name
from engine.data import portraits
from engine.model.dit import FACE_WEIGHT, MOUTH_WEIGHT, OUTPUT_WEIGHT_NAME, PRESETS, mouth_region
from engine.sampler import timesteps
from synccache import (BlockLayout, LayoutError, Schedule, ScheduleError, SyncCacheConfig, apply_synccache,
                       reference_layout)
from synccache.calibrate import SpanErrorRecorder
from synccache.probe import output_rel_l1, rel_l1

from dit_inputs import random_setup

torch.set_num_threads(1)
CFG = PRESETS["ref-XS"]
STEPS = 5


@pytest.fixture(scope="module")
def setup():
    """A random-weight DiT, a chunk condition and noise."""
    return random_setup(CFG, seed=1)


@torch.no_grad()
def _euler(dit, cond, noise, steps=STEPS):
    ts, x = timesteps(steps), noise
    for i in range(steps):
        x = x + (ts[i + 1] - ts[i]) * dit(x, ts[i].expand(x.shape[0]), cond)
    return x


def test_recorder_keeps_the_trajectory_and_measures_every_span(setup):
    dit, cond, noise = setup
    plain = _euler(dit, cond, noise)
    layout = reference_layout(dit)
    with SpanErrorRecorder(dit, layout, cross=True) as rec:
        rec.reset()
        first = _euler(dit, cond, noise)
        rec.reset(next_chunk=True)
        second = _euler(dit, cond, noise)
        err, cross = rec.errors(), rec.cross_errors()
    assert torch.equal(first, plain) and torch.equal(second, plain)  # recording never changes the output
    assert "forward" not in dit.__dict__ and all("forward" not in b.__dict__ for b in dit.blocks)
    assert len(err) == len(layout.spans()) and all(len(r) == STEPS for r in err)
    assert all(math.isinf(r[0]) for r in err)  # step 0 has no earlier residual
    assert all(v > 0 and math.isfinite(v) for r in err for v in r[1:])
    # the same chunk again: the previous chunk's residual at the same step is exact
    assert all(abs(v) < 1e-6 for r in cross for v in r)


def test_recorder_cross_errors_need_a_previous_chunk(setup):
    dit, cond, noise = setup
    with SpanErrorRecorder(dit, reference_layout(dit), cross=True) as rec:
        rec.reset()
        _euler(dit, cond, noise)
        rec.reset()  # a new session, not the next chunk
        _euler(dit, cond, noise)
        assert all(math.isinf(v) for r in rec.cross_errors() for v in r)


def _stream_schedule(n_spans, cross_steps):
    reuse = [[0] * STEPS for _ in range(n_spans)]
    cross = [[int(t in cross_steps) for t in range(STEPS)] for _ in range(n_spans)]
    return Schedule(reuse=reuse, cross=cross)


def test_stream_reuses_the_previous_chunk_and_refreshes(setup):
    dit, cond, noise = setup
    layout = reference_layout(dit)
    plain = _euler(dit, cond, noise)
    sched = _stream_schedule(len(layout.spans()), {0, 1, 2})
    with apply_synccache(dit, SyncCacheConfig(schedule=sched, stream=True, stream_refresh=2), layout) as h:
        outs = []
        for chunk in range(4):
            if chunk:
                h.reset(keep_stats=True, next_chunk=True)
            outs.append(_euler(dit, cond, noise))
        crossed = [s["crossed"] for s in h.stats()["spans"]]
        assert h.stats()["mode"] == "schedule+stream"
    # chunk 0 computes and banks; chunks 1, 2 take banked residuals (age 0, 1); chunk 3 must recompute
    assert crossed == [3 * 2] * len(crossed)
    for out in outs:  # identical inputs in every chunk: banked residuals are exact
        assert torch.allclose(out, plain, atol=1e-5)
    assert "forward" not in dit.__dict__ and all("forward" not in b.__dict__ for b in dit.blocks)


def test_stream_changes_output_when_inputs_change(setup):
    dit, cond, noise = setup
    layout = reference_layout(dit)
    sched = _stream_schedule(len(layout.spans()), {0, 1, 2, 3, 4})
    other = noise + 0.5 * torch.randn_like(noise)
    with apply_synccache(dit, SyncCacheConfig(schedule=sched, stream=True), layout) as h:
        _euler(dit, cond, noise)
        h.reset(keep_stats=True, next_chunk=True)
        streamed = _euler(dit, cond, other)
    assert not torch.allclose(streamed, _euler(dit, cond, other), atol=1e-4)


def test_stream_schedule_files_and_errors(tmp_path):
    sched = Schedule(reuse=[[0, 1, 0], [0, 0, 0]], cross=[[1, 0, 0], [0, 0, 1]])
    sched.save(tmp_path / "s.json")
    back = Schedule.load(tmp_path / "s.json")
    assert back.cross == sched.cross and back.cross_count == 2 and back.cached_spans == [0, 1]
    with pytest.raises(ScheduleError, match="both reuse and cross"):
        Schedule(reuse=[[0, 1]], cross=[[0, 1]])
    with pytest.raises(ScheduleError, match="'cross' must be"):
        Schedule(reuse=[[0, 1]], cross=[[0, 1, 0]])
    with pytest.raises(ValueError, match="needs a schedule with 'cross'"):
        SyncCacheConfig(schedule=Schedule(reuse=[[0, 1]]), stream=True)


def test_add_cross_never_accepts_more_error_than_the_schedule():
    err = [[math.inf, 0.1, 0.2, 0.5]]
    cross = [[0.05, 0.3, 0.15, 0.4]]
    sched = add_cross(Schedule(reuse=[[0, 1, 1, 0]]), err, cross)
    assert sched.cross == [[True, False, False, False]]  # 0.4 at step 3 exceeds the accepted 0.2


def test_budget_parsing():
    assert parse_budget("3", 1000, 4) == 3
    assert parse_budget("9", 1000, 4) == 4
    assert parse_budget("2K", 1000, 4) == 2
    assert parse_budget("1M", 300_000, 4) == 3
    for bad in ("x", "1.5", "-1"):
        with pytest.raises(ValueError):
            parse_budget(bad, 1000, 4)


def test_cache_config_by_name(tmp_path):
    assert cache_config("none", 20) is None and cache_name(None) == "none"
    sched = Schedule(reuse=[[0] + [1] * 4] * 4)
    sched.save(tmp_path / "s.json")
    cfg = cache_config("synccache", 5, schedule=tmp_path / "s.json")
    assert cfg.schedule.reuse_count == 16 and cache_name(cfg) == "synccache"
    with pytest.raises(ValueError, match="solved for 5 steps, not 20"):
        cache_config("synccache", 20, schedule=tmp_path / "s.json")
    with pytest.raises(ValueError, match="schedule not found"):
        cache_config("synccache", 20, schedule=tmp_path / "missing.json")
    assert cache_config("synccache", 20, threshold=0.2).threshold == 0.2
    assert cache_name(cache_config("fora", 20, 3)) == "fora"
    with pytest.raises(ValueError, match="integer interval"):
        cache_config("fora", 20, 2.5)
    with pytest.raises(ValueError, match="unknown cache method"):
        cache_config("warpdrive", 20)
    with pytest.raises(ValueError, match="calibration file"):
        cache_config("teacache", 20, calibration=tmp_path / "missing.json")


def test_recorder_errors_by_age(setup):
    """errors_by_age()[s][t][a-1]: span s reused at step t with the residual of step t-a; age 1 = errors()."""
    dit, cond, noise = setup
    plain = _euler(dit, cond, noise)
    tables = {}
    for forecast in (0, 1):
        with SpanErrorRecorder(dit, reference_layout(dit), max_age=3, forecast=forecast) as rec:
            rec.reset()
            assert torch.equal(_euler(dit, cond, noise), plain)
            tables[forecast] = rec.errors_by_age()
            one = rec.errors()
        for row, row1 in zip(tables[forecast], one):
            assert len(row) == STEPS and all(len(e) == 3 for e in row)
            for t, e in enumerate(row):
                assert (math.isinf(e[0]) and math.isinf(row1[t])) or e[0] == row1[t]
                for a in (1, 2, 3):
                    assert math.isfinite(e[a - 1]) == (a <= t)  # no residual before step 0
    for s in range(len(tables[0])):  # a slope needs steps t-a and t-2a >= 1 (never from step 0)
        for t in range(STEPS):
            for a in (1, 2, 3):
                p, f = tables[0][s][t][a - 1], tables[1][s][t][a - 1]
                if a <= t and t - 2 * a >= 1:
                    assert p != f
                elif a <= t:
                    assert p == f
    with pytest.raises(ValueError, match="max_age"):
        SpanErrorRecorder(dit, reference_layout(dit), max_age=0)


# ------------------------------------------------------------------ errors weighted towards the mouth
def _by_hand(dit, cond, x, t, bypass=None):
    """The DiT step written out: (velocity, {span: residual}); bypass=(span, residual) adds the residual
    instead of running the span's heavy blocks (what a reuse does), independently of the recorder."""
    h, c = dit.embed(x, t, cond)
    res = {}
    for s, (a, b) in enumerate(reference_layout(dit).spans()):
        inp = h
        if bypass is not None and bypass[0] == s:
            h = h + bypass[1]
        else:
            for i in range(a, b + 1):
                h = dit.blocks[i](h, c)
        res[s] = h - inp
        if b in dit.audio_slot:
            h = dit.audio_step(dit.audio_slot[b], h, cond)
    return dit.head(h, c, cond), res


def _plain_layout(dit, output_weight=None):
    ref = reference_layout(dit)
    return BlockLayout(heavy=ref.heavy, audio=ref.audio, audio_after=ref.audio_after, probe=0,
                       output_weight=output_weight)


def test_output_rel_l1_with_uniform_weights_is_the_plain_one():
    torch.manual_seed(0)
    ref = torch.randn(2, 4, 16, 8, 8)
    cur = ref + 0.1 * torch.randn_like(ref)
    assert output_rel_l1(cur, ref, None) == rel_l1(cur, ref)  # weight None: exactly today's number
    for w in (torch.ones(2, 1, 1, 1, 1), torch.full((2, 1, 1, 8, 8), 2.5), torch.ones_like(ref)):
        assert math.isclose(output_rel_l1(cur, ref, w), rel_l1(cur, ref), rel_tol=1e-5)
    w = torch.ones(2, 1, 1, 8, 8)
    w[:, ..., :4, :] = 10.0
    assert not math.isclose(output_rel_l1(cur, ref, w), rel_l1(cur, ref), rel_tol=1e-3)


def test_mouth_region_holds_the_moving_mouth():
    """The mouth region, derived from the face mask alone, holds the pixels an open mouth changes."""
    for ident in (0, 5, 17, 1001):
        idn = portraits.identity(ident)
        _, _, face = portraits.draw(idn)
        region = mouth_region(torch.from_numpy(face)[None].float())[0].numpy()
        assert region.any() and not (region & ~face).any()  # inside the face
        for openness, rounding, dx, dy in ((1.0, 0.0, 2, 2), (1.0, 0.0, -2, -2), (0.4, 1.0, 0, 0)):
            moved, _, _ = portraits.draw(idn, openness, rounding, 0, dx, dy)
            still, _, _ = portraits.draw(idn, 0, 0, 0, dx, dy)
            changed = np.abs(moved.astype(int) - still.astype(int)).sum(-1) > 30
            assert changed.sum() > 50 and (changed & region).sum() >= 0.98 * changed.sum()
        assert region.sum() < 0.4 * face.sum()  # the lower middle of the face, not all of it
    assert not mouth_region(torch.zeros(2, 128, 128)).any()  # no face, no mouth


def test_output_weight_face_and_mouth(setup):
    """ChunkCondition.output_weight: [B, 1, 1, h, w], background 1, face up to 4, mouth up to 16."""
    dit, _, _ = setup
    _, _, face = portraits.reference(3)
    fm = torch.from_numpy(face)[None].float()
    cfg = dit.cfg
    cond = dit.prepare(torch.zeros(1, cfg.latent_channels, cfg.latent_size, cfg.latent_size),
                       torch.zeros(1, cfg.motion_frames, cfg.latent_channels, cfg.latent_size, cfg.latent_size),
                       torch.zeros(1, cfg.audio_frames * 2, cfg.audio_dim), fm, fm, null_audio=True)
    w = cond.output_weight
    assert w.shape == (2, 1, 1, cfg.latent_size, cfg.latent_size)  # both halves of the guidance batch
    assert torch.equal(w[0], w[1])
    assert w.min() == 1.0 and w.max() == MOUTH_WEIGHT and FACE_WEIGHT == 4.0 and OUTPUT_WEIGHT_NAME == "face4_mouth16"
    mouth_cell = torch.nonzero(w[0, 0, 0] == MOUTH_WEIGHT)[0]
    assert mouth_cell[0] >= cfg.latent_size // 2  # the lower half of the frame
    layout = reference_layout(dit)
    out = torch.zeros(2, cfg.frames, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    assert layout.out_weight((out, torch.zeros(2), cond), {}, out) is w
    assert layout.out_weight((out, torch.zeros(2)), {"cond": cond}, out) is w
    assert layout.out_weight((out, torch.zeros(2), object()), {}, out) is None  # a condition without one


def test_a_mouth_perturbation_costs_more_than_a_background_one(setup):
    """Equal L1 perturbations: the same plain error, a far larger weighted one in the mouth."""
    dit, _, _ = setup
    _, _, face = portraits.reference(7)
    w = dit.output_weight(torch.from_numpy(face)[None].float())  # [1, 1, 1, 8, 8]
    torch.manual_seed(3)
    ref = torch.randn(1, dit.cfg.frames, dit.cfg.latent_channels, 8, 8)
    mouth = (w[0, 0, 0] == MOUTH_WEIGHT).nonzero()[0]
    background = (w[0, 0, 0] == 1.0).nonzero()[0]
    errs = {}
    for name, (r, c) in (("mouth", mouth), ("background", background)):
        cur = ref.clone()
        cur[..., r, c] += 0.5  # every frame and channel of one latent cell
        errs[name] = (output_rel_l1(cur, ref, w), rel_l1(cur, ref))
    assert math.isclose(errs["mouth"][1], errs["background"][1], rel_tol=1e-5)  # equal L1
    assert errs["mouth"][0] > 10 * errs["background"][0]  # 16x the weight
    assert math.isclose(errs["mouth"][0] / errs["background"][0], MOUTH_WEIGHT, rel_tol=1e-4)


def test_recorder_weights_errors_by_the_layout(setup):
    dit, cond, noise = setup
    plain = _euler(dit, cond, noise)
    tables, counts = {}, {}
    for name, layout, weighted in (("reference", reference_layout(dit), True),
                                   ("off", reference_layout(dit), False),
                                   ("none", _plain_layout(dit), True),
                                   ("ones", _plain_layout(dit, lambda a, k: torch.ones(1, 1, 1, 1, 1)), True)):
        with SpanErrorRecorder(dit, layout, max_age=2, cross=True, weighted=weighted) as rec:
            rec.reset()
            assert torch.equal(_euler(dit, cond, noise), plain)
            rec.reset(next_chunk=True)
            _euler(dit, cond, noise)
            tables[name] = (rec.errors_by_age(), rec.cross_errors())
            counts[name] = (rec.weighted_steps, rec.uniform_steps)
    assert counts["reference"][1] == 0 and counts["reference"][0] > 0
    assert counts["off"][0] == 0 and counts["none"][0] == 0 and counts["ones"][1] == 0
    assert tables["off"] == tables["none"]  # no weight: the same numbers, whichever way it is asked
    flat = {k: [v for row in t[0] for e in row for v in e if math.isfinite(v)] for k, t in tables.items()}
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(flat["ones"], flat["none"]))
    assert any(not math.isclose(a, b, rel_tol=1e-3) for a, b in zip(flat["reference"], flat["none"]))
    # an independent check of step 1: span s bypassed by its residual of step 0, by hand
    ts = timesteps(STEPS)
    w = cond.output_weight
    with torch.no_grad():
        v0, res = _by_hand(dit, cond, noise, ts[0].expand(1))
        x1 = noise + (ts[1] - ts[0]) * v0
        v1, _ = _by_hand(dit, cond, x1, ts[1].expand(1))
        for s in range(len(res)):
            vb, _ = _by_hand(dit, cond, x1, ts[1].expand(1), (s, res[s]))
            d = (vb - v1).abs()
            uniform = float(d.mean() / v1.abs().mean())
            weighted = float((w * d).sum() / (w * v1.abs()).sum())
            assert math.isclose(tables["none"][0][s][1][0], uniform, rel_tol=1e-4)
            assert math.isclose(tables["reference"][0][s][1][0], weighted, rel_tol=1e-4)


def test_output_weight_is_validated(setup):
    dit, cond, noise = setup
    out = torch.zeros(1, 4, 16, 8, 8)
    BlockLayout.check_output_weight(torch.ones(1, 1, 1, 8, 8), out)
    BlockLayout.check_output_weight(torch.ones(1, 4, 16, 8, 8), out)
    for bad in (torch.ones(8, 8), torch.ones(2, 1, 1, 8, 8), torch.ones(1, 1, 1, 4, 4), torch.ones(1, 1, 8, 8)):
        with pytest.raises(LayoutError, match=r"output weight has shape .* broadcastable to the output"):
            BlockLayout.check_output_weight(bad, out)
    for bad in (-torch.ones(1, 1, 1, 8, 8), torch.zeros(1, 1, 1, 8, 8), torch.full((1, 1, 1, 1, 1), math.nan)):
        with pytest.raises(LayoutError, match="finite, non-negative and not all zero"):
            BlockLayout.check_output_weight(bad, out)
    with pytest.raises(LayoutError, match="not a tensor"):
        BlockLayout.check_output_weight([[1.0]], out)
    with pytest.raises(LayoutError, match="output_weight must be a function"):
        _plain_layout(dit, output_weight=torch.ones(1))
    wrong = _plain_layout(dit, lambda a, k: torch.ones(1, 1, 4, 4))  # a grid, not per sample
    with SpanErrorRecorder(dit, wrong) as rec:
        rec.reset()
        with pytest.raises(LayoutError, match=r"output weight has shape \[1, 1, 4, 4\]"):
            _euler(dit, cond, noise)
    assert "forward" not in dit.__dict__  # removed on the way out


def test_run_chunks_uses_the_microphone_audio_from_just_before_the_speech(monkeypatch):
    """Calibration chunks get the clip's augmented audio, start one chunk before its speech, at most
    max_chunks per clip; a clip without speech starts at its start."""
    import types

    import engine.calibrate as ec
    import engine.generator as eg
    calls = []

    class Gen:
        def __init__(self, model, avatar, **kw):
            calls.append(("new", avatar.avatar_id))

        def chunk(self, audio, start_frame):
            calls.append(("chunk", audio, start_frame))

    monkeypatch.setattr(eg, "ChunkGenerator", Gen)
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(frames=4))

    def clip(openness, seed):
        rng = np.random.default_rng(seed)
        return {"openness": np.asarray(openness, np.float32), "audio": rng.normal(size=8000).astype(np.float32),
                "audio_clean": rng.normal(size=8000).astype(np.float32), "ref": np.zeros((128, 128, 3), np.uint8),
                "ref_person_mask": np.zeros((128, 128), np.uint8), "ref_face_mask": np.zeros((128, 128), np.uint8)}

    speech = clip([0.0] * 13 + [0.5] * 60, 0)  # speech from frame 13 (chunk 3): start at chunk 2
    silent = clip([0.0] * 10, 1)  # 3 chunks, no speech
    seen = []
    ec.run_chunks(model, [speech, silent], 4, 1.0, 0.5, max_chunks=5, before_chunk=seen.append, progress=False)
    chunks = [c for c in calls if c[0] == "chunk"]
    assert [c[2] for c in chunks] == [8, 12, 16, 20, 24, 0, 4, 8]
    assert seen == [0, 1, 2, 3, 4, 0, 1, 2]  # 0: a new session
    assert all(np.array_equal(c[1].numpy(), speech["audio"]) for c in chunks[:5])  # never audio_clean
    assert all(np.array_equal(c[1].numpy(), silent["audio"]) for c in chunks[5:])
    assert ec.first_chunk(speech, 4) == 2 and ec.first_chunk(silent, 4) == 0
    assert ec.DEFAULT_CLIPS * ec.DEFAULT_CHUNKS_PER_CLIP == 48  # the cost of 4 clips x 12 chunks before


def test_resolve_carries_the_error_weight(tmp_path):
    """--errors-from keeps the file's weighting; files from before it were uniform; a mismatch is refused."""
    from engine.calibrate import calibrate
    err = [[None] + [[0.1 * (s + 1), 0.2 * (s + 1)]] * 4 for s in range(2)]
    src, out = tmp_path / "src.json", tmp_path / "out.json"
    opts = {"errors_from": src, "max_run": 2, "reuse_fraction": 0.5, "progress": False}
    for recorded in ("face4_mouth16", None):
        Schedule(reuse=[[0] * 5] * 2, meta={"span_errors": err, "span_bytes": 1, "forecast": 1}
                 | ({"error_weight": recorded} if recorded else {})).save(src)
        summary = calibrate(None, out, 5, "2", **opts)
        want = recorded or "uniform"
        assert summary["error_weight"] == want and Schedule.load(out).meta["error_weight"] == want
        calibrate(None, out, 5, "2", error_weight="mouth" if recorded else "uniform", **opts)
        with pytest.raises(ValueError, match="recorded errors weighted"):
            calibrate(None, out, 5, "2", error_weight="uniform" if recorded else "mouth", **opts)
    with pytest.raises(ValueError, match="error weight must be one of"):
        calibrate(None, out, 5, "2", error_weight="lips", progress=False)
