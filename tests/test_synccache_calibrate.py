"""Calibration (span reuse errors), the streaming extension (cross-chunk reuse) and method selection."""
import math

import pytest
import torch

from engine.calibrate import add_cross, parse_budget
from engine.caching import cache_config, cache_name
from engine.model.dit import PRESETS
from engine.sampler import timesteps
from synccache import Schedule, ScheduleError, SyncCacheConfig, apply_synccache, reference_layout
from synccache.calibrate import SpanErrorRecorder

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
