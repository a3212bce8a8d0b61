"""The pure parts of a live session (streaming/policy.py): chunk forming, the backpressure policy, chunk
records. No clock, no threads: every test is instant and deterministic."""
import random

import numpy as np
import pytest

from streaming.policy import Backpressure, Chunker, ChunkRecord, Decision, frame_kind


def _chunker(**kw):
    args = dict(frames=4, lookback=4, lookahead=2, margin=1, lookahead_wait=2, hangover_ms=200, delay_s=0.4)
    return Chunker(**(args | kw))


# ------------------------------------------------------------------------------------- chunker
def test_chunk_is_ready_once_its_audio_and_waited_lookahead_arrived():
    ch = _chunker()
    # 4 frames + 2 look-ahead frames = 240 ms after its first sample (README), then one chunk every 160 ms
    assert [ch.ready_s(c) for c in range(3)] == pytest.approx([0.24, 0.40, 0.56])
    assert ch.needed(0) == 6 * 640
    assert [_chunker(lookahead_wait=0).ready_s(c) for c in range(2)] == pytest.approx([0.16, 0.32])
    assert _chunker(lookahead_wait=9).needed(5) == ch.needed(5)  # never waits past the model's look-ahead
    assert [ch.deadline_s(c) for c in range(3)] == pytest.approx([0.40, 0.56, 0.72])
    # with the default delay every chunk is ready 160 ms before its first frame is due
    assert all(ch.deadline_s(c) - ch.ready_s(c) == pytest.approx(0.16) for c in range(100))


def test_chunk_window_is_what_the_worker_expects():
    """The worker reads the chunk at lookback + margin frames into a window of audio_frames + 2 margin."""
    from engine.model.audio_encoder import MARGIN_FRAMES
    from engine.model.dit import DiTConfig
    cfg = DiTConfig()
    ch = Chunker(cfg.frames, cfg.lookback, cfg.lookahead, MARGIN_FRAMES, 2, 200, 0.4)
    for c in (0, 1, 7):
        start, stop = ch.window(c)
        assert stop - start == (cfg.audio_frames + 2 * MARGIN_FRAMES) * 640
        assert c * cfg.frames * 640 - start == (cfg.lookback + MARGIN_FRAMES) * 640
        assert stop > ch.needed(c)  # the margin after the look-ahead is never waited for: zeros


def test_chunk_formed_after_its_deadline_is_late_not_generated():
    ch = _chunker()
    talking = lambda first, count: np.ones(count, bool)  # noqa: E731
    assert ch.plan(2, ch.deadline_s(2), talking) == "speech"  # just in time
    assert ch.plan(2, ch.deadline_s(2) + 0.001, talking) == "late"
    assert ch.plan(2, ch.deadline_s(2) + 0.001, lambda f, n: np.zeros(n, bool)) == "late"
    assert ch.plan(2, ch.ready_s(2), lambda f, n: np.zeros(n, bool)) == "idle"


@pytest.mark.parametrize("hangover_ms, hang_frames", [(0, 0), (200, 5), (210, 6)])
def test_hangover_keeps_the_chunks_after_speech_generated(hangover_ms, hang_frames):
    """One VAD frame of speech at frame f makes speech of exactly the chunks whose frames, look-ahead
    (2 frames) or hangover (rounded up to whole frames) cover it."""
    ch = _chunker(hangover_ms=hangover_ms)
    assert ch.hangover_frames == hang_frames
    for f in (0, 9, 10, 37):
        flags = np.zeros(200, bool)
        flags[f] = True
        speech = {c for c in range(40) if ch.plan(c, 0.0, lambda first, n: flags[first:first + n]) == "speech"}
        want = {c for c in range(40) if 4 * c - hang_frames <= f < 4 * c + 4 + 2}
        assert speech == want, f
    flags = np.zeros(200, bool)
    flags[9] = True  # chunk 1 (frames 4-7) by its look-ahead, chunk 2 (8-11) its own frames, chunk 3 (12-15)
    expect = {0: {1, 2}, 5: {1, 2, 3}, 6: {1, 2, 3}}[hang_frames]  # by a hangover reaching back to frame 7
    assert {c for c in range(10) if ch.plan(c, 0.0, lambda first, n: flags[first:first + n]) == "speech"} == expect
    flags[9], flags[10] = False, True  # chunk 4 (16-19) reaches back to frame 10 only with 6 frames
    expect = {0: {2}, 5: {2, 3}, 6: {2, 3, 4}}[hang_frames]
    assert {c for c in range(10) if ch.plan(c, 0.0, lambda first, n: flags[first:first + n]) == "speech"} == expect


# -------------------------------------------------------------------------------------- policy
def test_raises_to_the_boost_cache_when_a_chunk_is_predicted_late():
    p = Backpressure(2, recover_chunks=3, safety_s=0.02)
    assert p.choose(0, 10.0, (9.98, 9.9), worker_idle=False) == (0, None)  # exactly safety_s early: on time
    level, d = p.choose(1, 10.0, (9.99, 9.9), worker_idle=False)  # 10 ms inside the safety margin
    assert level == 1 and d == Decision("raise", 1, "chunk 1 predicted 10 ms late")
    assert p.level == 1


def test_skips_a_chunk_when_the_boost_cache_is_late_too_but_never_on_an_idle_worker():
    p = Backpressure(2, recover_chunks=3)
    level, d = p.choose(0, 10.0, (10.3, 10.1), worker_idle=False)
    assert level == 2 and d.action == "raise" and d.level == 2 and "300 ms late" in d.reason
    assert p.level == 1  # skipping is per chunk: the next one tries the boost cache again
    level, d = p.choose(1, 10.0, (10.3, 9.9), worker_idle=False)
    assert (level, d) == (1, None)
    q = Backpressure(2, recover_chunks=3)
    level, d = q.choose(0, 10.0, (10.3, 10.1), worker_idle=True)  # nothing queued: generate, keep timing
    assert level == 1 and d == Decision("raise", 1, "chunk 0 predicted 300 ms late")


def test_steps_down_after_recover_chunks_on_time_and_only_if_the_lower_level_is_on_time():
    p = Backpressure(2, recover_chunks=4)
    assert p.choose(0, 10.0, (10.1, 9.9), False)[0] == 1
    on_time = (9.5, 9.4)
    assert [p.choose(c, 10.0, on_time, False) for c in (1, 2, 3)] == [(1, None)] * 3
    assert p.choose(4, 10.0, on_time, False) == (0, Decision("lower", 0, "4 chunks on time"))
    assert p.level == 0 and p.on_time == 0
    # level 0 still too slow after the recovery count: stay at 1 until it is on time
    p = Backpressure(2, recover_chunks=2)
    p.choose(0, 10.0, (10.1, 9.9), False)
    assert [p.choose(c, 10.0, (10.1, 9.9), False)[0] for c in range(1, 6)] == [1] * 5
    assert p.choose(6, 10.0, on_time, False) == (0, Decision("lower", 0, "6 chunks on time"))


def test_steady_load_gives_one_decision_not_oscillation():
    """Level 0 a little late, level 1 on time, for 200 chunks: one raise, then the level holds."""
    p = Backpressure(2, recover_chunks=8)
    out = [p.choose(c, 10.0, (10.01, 9.9), False) for c in range(200)]
    assert [d for _, d in out if d] == [Decision("raise", 1, "chunk 0 predicted 10 ms late")]
    assert {lvl for lvl, _ in out} == {1}


def test_a_ladder_of_three_cache_levels_raises_to_the_first_on_time_and_steps_down_one_at_a_time():
    p = Backpressure(3, recover_chunks=2)
    level, d = p.choose(0, 10.0, (10.2, 10.1, 9.9), worker_idle=False)  # levels 0 and 1 late: straight to 2
    assert (level, d) == (2, Decision("raise", 2, "chunk 0 predicted 200 ms late"))
    on_time = (9.5, 9.4, 9.3)
    assert [p.choose(c, 10.0, on_time, False) for c in (1, 2, 3, 4)] == [
        (2, None), (1, Decision("lower", 1, "2 chunks on time")), (1, None), (0, Decision("lower", 0, "2 chunks on time"))]
    level, d = p.choose(5, 10.0, (10.3, 10.2, 10.1), worker_idle=False)  # every cache level late: skip
    assert (level, d.level, p.level) == (3, 3, 2)
    assert p.choose(6, 10.0, (10.3, 10.2, 10.1), worker_idle=True)[0] == 2  # never skip on an idle worker


def test_a_single_cache_level_skips_when_late():
    p = Backpressure(1, recover_chunks=2)
    assert p.choose(0, 10.0, (10.1,), worker_idle=False) == (1, Decision("raise", 1, "chunk 0 predicted 100 ms late"))
    assert p.level == 0 and p.choose(1, 10.0, (9.0,), worker_idle=False) == (0, None)
    assert p.choose(2, 10.0, (10.1,), worker_idle=True)[0] == 0
    with pytest.raises(ValueError):
        Backpressure(0, recover_chunks=2)


def test_levels_the_worker_cannot_keep_up_are_left_and_never_stepped_down_to():
    """Level 0 is on time for this chunk but holds the worker longer than a chunk period (keeps_up False):
    the policy goes to the first level that is on time and kept up, and does not step back down to 0 however
    long it stays on time; the top cache level counts as kept up; where level 0 can be kept up again, the
    policy steps down as before."""
    p = Backpressure(3, recover_chunks=2)
    on_time, slow0 = (9.0, 9.0, 9.0), (False, True, True)
    assert p.choose(0, 10.0, on_time, False, slow0) == (
        1, Decision("raise", 1, "chunk 0 its level cannot be kept up chunk after chunk"))
    assert [p.choose(c, 10.0, on_time, False, slow0) for c in range(1, 6)] == [(1, None)] * 5
    assert p.choose(6, 10.0, on_time, False, (False, False, False))[0] == 2  # the top level is never left for this
    assert p.choose(7, 10.0, (9.0, 9.0, 10.5), False, (False, False, False))[0] == 3  # late there too: skip
    assert p.choose(8, 10.0, on_time, False, (True, True, True))[0] == 2
    assert p.choose(9, 10.0, on_time, False, (True, True, True)) == (1, Decision("lower", 1, "2 chunks on time"))


@pytest.mark.parametrize("levels,seed", [(2, s) for s in range(5)] + [(3, s) for s in range(3)] + [(1, 0)])
def test_policy_invariants_under_random_load(levels, seed):
    """Random predictions around the deadline and random levels the worker cannot keep up: a level is used
    only when predicted on time (or the top cache level on an idle worker) and kept up (or the top), skip
    only when every cache level from the current one is late or not kept up, and a step down comes at least
    recover_chunks chunks after the previous decision (no oscillation)."""
    rng = random.Random(seed)
    recover, safety, deadline, top = 5, 0.02, 10.0, levels - 1
    p = Backpressure(levels, recover_chunks=recover, safety_s=safety)
    last_decision, actions = -1, []
    for c in range(2000):
        spread = rng.choice((0.05, 0.3))
        finish = [deadline + rng.uniform(-spread, spread) - 0.05 * lvl for lvl in range(levels)]
        idle = rng.random() < 0.1
        keeps = [rng.random() < 0.9 for _ in range(levels)]
        before = p.level
        level, d = p.choose(c, deadline, finish, idle, keeps)
        on_time = [f <= deadline - safety for f in finish]
        fit = [t and (k or lvl == top) for lvl, (t, k) in enumerate(zip(on_time, keeps))]
        assert level >= top or keeps[level]
        if level == levels:
            assert not any(fit[before:]) and not idle
        elif not on_time[level]:
            assert level == top and idle and not any(fit[before:])  # the idle worker generates anyway
        if level < before:
            assert d and d.action == "lower" and level == before - 1
            assert c - last_decision >= recover, (c, last_decision)
            assert fit[level]
        if level > before:
            assert d and d.action == "raise"
            assert level == levels or level == top and idle or not any(fit[before:level])  # the first fit
        if d:
            assert d.level == level
            last_decision = c
            actions.append(d.action)
        assert 0 <= p.level <= top
    assert actions.count("raise") > 10  # the load did move the level
    assert levels == 1 or actions.count("lower") > 10


# ------------------------------------------------------------------------------- chunk records
def test_chunk_record_message_leaves_out_what_does_not_apply():
    rec = ChunkRecord(3, "idle", 0, capture_ms=None, ready_ms=120.0, deadline_ms=520.0)
    assert rec.message() == {"chunk": 3, "kind": "idle", "level": 0, "ready_ms": 120.0, "deadline_ms": 520.0}
    assert ChunkRecord(4, "missing", reason="its audio had not arrived").message() == {
        "chunk": 4, "kind": "missing", "reason": "its audio had not arrived"}


def test_chunk_record_finish_derives_latency_offset_and_late_kind():
    rec = ChunkRecord(0, "speech", 0, capture_ms=5.0, send_ms=400.0, late_frames=4)
    rec.finish(4, transport_ms=140, video_sent=1.0, audio_sent=1.0002)
    assert rec.kind == "late"  # generated, but every frame showed idle
    assert rec.latency_est_ms == 535.0 and rec.av_offset_ms == 0.2
    rec = ChunkRecord(1, "speech", 0, send_ms=560.0, late_frames=3)
    rec.finish(4, transport_ms=140, video_sent=None, audio_sent=2.0)
    assert rec.kind == "speech" and rec.av_offset_ms == 0.0 and rec.latency_est_ms is None
    assert "latency_est_ms" not in rec.message()


def test_frame_kind():
    assert frame_kind(ChunkRecord(0, "speech"), True) == "speech"
    assert frame_kind(ChunkRecord(0, "speech"), False) == "late"
    assert frame_kind(ChunkRecord(0, "error"), False) == "late"
    assert frame_kind(ChunkRecord(0, "skipped"), False) == "idle"
    assert frame_kind(None, False) == "idle"
