"""The generation worker serving several sessions: continuous batching (one chunk per session per batch,
control messages keep their order), batch-aware finish predictions, capacity, and batched chunks equal to
the same chunks generated alone."""
import collections

import numpy as np
import pytest
import torch

from streaming.protocol import ChunkRequest, EndSession
from streaming.worker import GenerationWorker
from streaming.worker_process import next_batch

torch.set_num_threads(1)


def _req(job, session, level=0):
    return ChunkRequest(job, session, "0", np.zeros(4, np.float32), level, None)


def test_next_batch_one_chunk_per_session_in_order():
    backlog = collections.deque([_req(1, "a"), _req(2, "b"), _req(3, "b"), _req(4, "c", level=1), _req(5, "d")])
    batch = next_batch(_req(0, "a"), backlog, max_batch=4)
    assert [r.job for r in batch] == [0, 2, 4, 5]  # a's and b's second chunks wait; c's level 1 joins
    assert [r.job for r in backlog] == [1, 3]
    assert [r.job for r in next_batch(backlog.popleft(), backlog, max_batch=2)] == [1, 3]
    backlog = collections.deque([_req(1, "b"), EndSession("b"), _req(2, "c")])
    assert [r.job for r in next_batch(_req(0, "a"), backlog, max_batch=4)] == [0, 1]  # never past a control
    assert isinstance(backlog[0], EndSession) and backlog[1].job == 2
    backlog = collections.deque([_req(1, "b"), _req(2, "c")])
    assert len(next_batch(_req(0, "a"), backlog, max_batch=1)) == 1 and len(backlog) == 2


def _worker(dit_ms, decode_ms=(0.0,), first_ms=(0.0,), pipelined=False, decode_every=None, decode_scale=None):
    """The server-side bookkeeping only, no process: per level the DiT ms of a batch of 1, 2, ... chunks;
    decode_ms: of decoding every frame of a batch of 1, 2, ... chunks; decode_every, decode_scale: per level
    (all 1)."""
    from engine.config import LevelConfig
    w = GenerationWorker.__new__(GenerationWorker)
    w.dit_ms, w._jobs, w.pending, w._speaking = [list(d) for d in dit_ms], {}, 0, {}
    w.pipelined, w.decode_ms, w.first_ms, w._heads = pipelined, list(decode_ms), list(first_ms), {}
    w._decoding = {}
    w.decode_scale = list(decode_scale or [1.0] * len(dit_ms))
    w.cfg = type("DiTConfig", (), {"frames": 4})()
    levels = [LevelConfig(decode_every=k, decoder="" if x == 1.0 else "lite.safetensors")
              for k, x in zip(decode_every or [1] * len(dit_ms), w.decode_scale)]
    w.config = type("Config", (), {"live": type("Live", (), {"batch_wait_ms": 30, "levels": levels})()})()
    import threading
    w._lock = threading.Lock()
    return w


def test_sessions_supported_by_throughput_and_latency():
    w = _worker([[100.0, 170.0, 230.0], [80.0, 140.0, 185.0]])  # levels 0 and 1, in sequence, decoding free
    assert w.sessions_supported(slack_ms=140) == (1, 0, 100.0)  # a batch of 2 needs 140 + 30 ms
    w.dit_ms[1][1] = 130.0
    assert w.sessions_supported(slack_ms=220) == (2, 1, 130.0)  # level 1 serves two (170 > 136 ms)
    assert w.sessions_supported(slack_ms=1000)[0] == 2  # 3 sessions: 185 ms per 160 ms of speech
    w.dit_ms[1][1] = 140.0
    assert w.sessions_supported(slack_ms=1000)[0] == 1  # 140 ms is over 85% of the 160 ms period
    assert w.sessions_supported(slack_ms=50)[0] == 0


def test_predictions_count_rounds_of_batches():
    w = _worker([[100.0, 150.0, 190.0]])  # ms of a batch of 1, 2, 3 chunks
    assert w.first_frame_ms(0, [1]) == 100.0
    assert w.first_frame_ms(0, [2]) == 150.0  # one batch of two
    assert w.first_frame_ms(0, [1, 1, 1]) == 300.0  # one session's chunks never share a batch
    assert w.first_frame_ms(0, [2, 1]) == 150.0 + 100.0
    assert w.batch_estimate_ms(0, 4) == 190.0 + 100.0  # past the batch size: another batch
    from streaming.worker import Job
    w._jobs = {1: Job("a", "0", None, 0, None, None), 2: Job("b", "0", None, 0, None, None)}
    assert w.predict_finish(0, 10.0, "c") == pytest.approx(10.0 + 0.19)
    assert w.predict_finish(0, 10.0, "a") == pytest.approx(10.0 + 0.19 + 0.1)  # c speaks: in this round too
    w._jobs = {}
    assert w.predict_finish(0, 10.1, "d") == pytest.approx(10.1 + 0.19)  # a and c join d's round
    assert w.predict_finish(0, 10.6, "d") == pytest.approx(10.6 + 0.1)  # they have been silent 0.5 s
    seq = _worker([[100.0]])  # a level that cannot batch
    assert seq.batch_estimate_ms(0, 2) == seq.first_frame_ms(0, [2]) == 200.0


def test_predictions_are_for_the_first_frame_of_a_chunk():
    """A chunk's first frame is due first and decoded first. Pipelined (decoding beside the next batch's
    DiT), a batch holds the worker for its slower stage, and a chunk's first frame is ready once its own DiT
    has ended and the decode thread has decoded it (after the batches before it); in sequence a batch runs
    both stages and the first frames come out before the rest is decoded."""
    w = _worker([[60.0, 90.0]], decode_ms=[30.0, 55.0], first_ms=[10.0, 18.0], pipelined=True)
    assert w.predict_finish(0, 10.0, "a") == pytest.approx(10.0 + 0.06 + 0.01)
    from streaming.worker import Job
    w._jobs = {1: Job("a", "0", None, 0, None, None)}
    assert w.predict_finish(0, 10.0, "a") == pytest.approx(10.0 + 0.12 + 0.01)  # after its earlier chunk's DiT
    assert w.predict_finish(0, 10.0, "b") == pytest.approx(10.0 + 0.09 + 0.018)  # a and b in one batch
    assert w.batch_ms == [[60.0, 90.0]] and w.sessions_supported(slack_ms=200) == (2, 0, 90.0)
    assert w.sessions_supported(slack_ms=130)[0] == 1  # 90 + 18 > 100 ms of slack: one session only
    w.pipelined = False  # in sequence: DiT + decode
    assert w.batch_ms == [[90.0, 145.0]]
    assert w.predict_finish(0, 10.6, "a") == pytest.approx(10.6 + 0.06 + 0.03 + 0.06 + 0.01)  # b silent


def test_where_decoding_is_the_slower_stage_a_first_frame_waits_for_its_own_dit_not_a_decode():
    """A slow CPU (AVX2, fp32): DiT 70 ms, decoding 105 ms a chunk. Alone, a chunk's first frame is ready
    after its DiT and its first frame's decode (70 + 28), not after a round of the slower stage (105 + 28);
    with chunks queued ahead, the decode thread's backlog delays it."""
    w = _worker([[70.0]], decode_ms=[105.0], first_ms=[28.0], pipelined=True)
    assert w.first_frame_ms(0, [1]) == pytest.approx(98.0)
    assert w.batch_estimate_ms(0, 1) == 105.0  # what the worker can sustain: one chunk per 105 ms
    # two ahead: DiTs end at 70, 140, 210; decodes run 70-175, 175-280; the third's first frame 280 + 28
    assert w.first_frame_ms(0, [1, 1, 1]) == pytest.approx(308.0)
    assert w.sessions_supported(slack_ms=140 + 30) == (1, 0, 105.0)


def test_a_chunk_past_its_dit_counts_only_as_the_decoder_busy():
    """The previous chunk of the session has left the DiT (DitDone) and is being decoded: the next one's
    DiT starts at once and its first frame waits for the decoder only if that is still busy then. Counting
    the previous chunk as a whole round ahead predicted every other chunk late on a slow CPU."""
    from streaming.protocol import ChunkDone, DitDone
    from streaming.worker import Job
    w = _worker([[70.0]], decode_ms=[105.0], first_ms=[28.0], pipelined=True)
    w.gen_ms, w._out = [175.0], __import__("queue").Queue()
    w._jobs = {1: Job("a", "0", None, 0, None, lambda f, i: None)}
    w.pending = 1
    assert w.predict_finish(0, 10.0, "a") == pytest.approx(10.0 + 0.07 + 0.105 + 0.028)  # a whole round ahead
    w._out.put(DitDone([1], 9.95))  # its DiT ended 50 ms ago: the decoder is busy until 10.055
    w._out.put(None)
    w._read()
    assert w._decoding == {1: (9.95, 1, 0)}
    assert w.predict_finish(0, 10.0, "a") == pytest.approx(10.0 + 0.07 + 0.028)  # the decoder is free by 10.07
    assert w.predict_finish(0, 10.0 - 0.04, "a") == pytest.approx(10.055 + 0.028)  # not yet: its first frame waits
    w._out.put(ChunkDone(1, np.zeros((4, 2, 2, 3), np.uint8), {"level": 0, "batch": 1, "dit_ms": 70.0,
                                                                 "decode_ms": 105.0, "first_ms": 28.0}))
    w._out.put(None)
    w._read()
    assert w._decoding == {} and w.pending == 0


def test_learning_keeps_each_stage_apart():
    w = _worker([[100.0, 150.0]], decode_ms=[30.0, 50.0], first_ms=[10.0, 15.0], pipelined=True)
    w.gen_ms = [100.0]
    w._learn({"level": 0, "batch": 2, "dit_ms": 80.0, "decode_ms": 60.0, "first_ms": 20.0})
    assert w.dit_ms[0][1] == pytest.approx(0.8 * 150 + 0.2 * 80)
    assert w.decode_ms[1] == pytest.approx(0.8 * 50 + 0.2 * 60) and w.gen_ms == [100.0]
    assert w.first_ms[1] == pytest.approx(0.8 * 15 + 0.2 * 20)
    w._learn({"level": 0, "batch": 1, "dit_ms": 70.0, "decode_ms": 30.0, "first_ms": 10.0})
    assert w.dit_ms[0][0] == pytest.approx(0.8 * 100 + 0.2 * 70) and w.gen_ms[0] == pytest.approx(100.0)


def test_reader_gives_first_frames_early_or_with_the_rest():
    """The server side: a job with an `early` callback gets its first frame at once and the rest after; a
    job without one gets all its frames in `done`."""
    from streaming.protocol import ChunkDone, FirstFrame
    from streaming.worker import Job
    w = _worker([[100.0]])
    w.gen_ms, w._out = [100.0], __import__("queue").Queue()
    calls = []
    w._jobs = {1: Job("a", "0", None, 0, None, lambda f, i: calls.append(("done a", f[:, 0, 0, 0].tolist(), i["first"])),
                      lambda f, t: calls.append(("early a", f[:, 0, 0, 0].tolist(), t))),
               2: Job("b", "0", None, 0, None, lambda f, i: calls.append(("done b", f[:, 0, 0, 0].tolist(), i["first"])))}
    w.pending = 2
    frames = np.arange(4, dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2).repeat(3, 3)
    info = {"level": 0, "batch": 2, "dit_ms": 50.0, "decode_ms": 30.0, "first_ms": 10.0}
    for job in (1, 2):
        w._out.put(FirstFrame(job, frames[:1], 5.0))
    for job in (1, 2):
        w._out.put(ChunkDone(job, frames[1:], info | {"batch_index": job - 1}, first=1))
    w._out.put(None)
    w._read()
    assert calls == [("early a", [0], 5.0), ("done a", [1, 2, 3], 1), ("done b", [0, 1, 2, 3], 0)]
    assert w.pending == 0 and not w._heads


@pytest.fixture(scope="module")
def model():
    from engine.config import load_config
    from engine.model.avatar import load_model
    cfg = load_config()
    return cfg, load_model(cfg.path(cfg.model.weights))


def test_batched_chunks_equal_the_same_chunks_alone(model):
    """Three sessions (other avatars, audio, seeds), three chunks each, under the live SyncCache schedule:
    denoised as one batch per chunk they come out as each alone (latents within 1e-4)."""
    from engine.caching import attach, cache_config
    from engine.generator import ChunkGenerator, chunk_batch, load_avatar
    cfg, m = model
    cache = cache_config("synccache", cfg.live.steps, schedule=cfg.path(cfg.live.levels[0].schedule),
                         stream_schedule=cfg.path(cfg.live.levels[0].schedule), calibration=cfg.path(cfg.cache.calibration))
    rng = np.random.default_rng(0)
    audio = [torch.from_numpy((0.1 * rng.standard_normal(16000 * 2)).astype(np.float32)) for _ in range(3)]

    def gens():
        return [ChunkGenerator(m, load_avatar(str(i)), steps=cfg.live.steps, seed=i, guidance=cfg.model.guidance,
                               noise_scale=cfg.model.noise_scale) for i in (0, 5, 1000)]
    handle = attach(m.dit, cache)
    try:
        alone, lat_alone = [], []
        for g, a in zip(gens(), audio):
            frames = []
            for c in range(3):
                handle.reset(keep_stats=True)
                frames.append(g.chunk(a, 8 + 4 * c))
            alone.append(frames)
            lat_alone.append(g.last_latents)
        gs, batched = gens(), [[], [], []]
        for c in range(3):
            handle.reset(keep_stats=True)
            for i, f in enumerate(chunk_batch(gs, audio, [8 + 4 * c] * 3)):
                batched[i].append(f)
        assert handle.stats()["reuse_steps"] > 0
    finally:
        handle.remove()
    for i, g in enumerate(gs):
        assert (g.last_latents - lat_alone[i]).abs().max().item() <= 1e-4
        diff = max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(alone[i], batched[i]))
        assert diff <= 1, diff
    assert not np.array_equal(batched[0][0], batched[1][0])  # other sessions, other frames
    with pytest.raises(ValueError, match="share the model"):
        other = ChunkGenerator(m, load_avatar("0"), steps=cfg.live.steps + 1)
        chunk_batch([gs[0], other], audio[:2], [8, 8])


def test_gather_waits_only_for_expected_sessions():
    import queue as q
    from streaming.worker_process import gather
    inq = q.Queue()
    inq.put(_req(1, "b"))
    batch, backlog = [_req(0, "a")], collections.deque()
    gather(batch, backlog, inq, 4, expected={"a", "b"}, wait_s=1.0)
    assert [r.session for r in batch] == ["a", "b"] and not backlog
    inq.put(_req(2, "c"))
    batch = [_req(3, "a")]
    gather(batch, backlog, inq, 4, expected={"a"}, wait_s=1.0)  # nobody else expected: no wait, no read
    assert len(batch) == 1 and inq.qsize() == 1
    batch = [_req(4, "a")]
    inq.put(EndSession("x"))
    gather(batch, backlog, inq, 4, expected={"a", "b"}, wait_s=1.0)  # c joins, the control message stops it
    assert [r.session for r in batch] == ["a", "c"] and isinstance(backlog[0], EndSession)


def test_sessions_share_one_chunk_grid():
    w = _worker([[100.0]])
    w._grid0 = None
    w.cfg = type("DiTConfig", (), {"frames": 4})()
    assert w.aligned_start(10.0) == 10.0
    assert w.aligned_start(10.25) == pytest.approx(10.16)  # 160 ms chunks
    assert w.aligned_start(10.32) == pytest.approx(10.32)


def test_worker_process_batches_sessions_on_one_grid():
    """The real worker process: two sessions' chunks submitted 6 ms apart (as sessions on one chunk grid
    are) are denoised together; a third session's, submitted alone, runs alone."""
    import threading
    import time

    from engine.config import load_config
    from streaming.worker import Job
    cfg = load_config()
    cfg.live.max_batch = 4
    w = GenerationWorker(cfg)
    try:
        assert len(w.dit_ms[0]) == 4 and w.dit_ms[0][1] > w.dit_ms[0][0]
        got, done = [], threading.Event()
        window = np.zeros(12 * 640, np.float32)

        def cb(session, c):
            def f(frames, info):
                got.append((session, c, info.get("batch"), info.get("gen_start"), frames is not None))
                if len(got) == 13:
                    done.set()
            return f
        top = len(w.level_names) - 1  # the cheapest level: the worker keeps up on slow CPUs too
        t0 = time.monotonic()
        for c in range(6):
            # every 300 ms, not the live grid's 160: a batch of two takes ~160-180 ms here, and a worker
            # that falls behind pairs a's chunk c with b's chunk c - 1 (this test checks pairing, not speed)
            time.sleep(max(0.0, t0 + 0.3 * c - time.monotonic()))
            w.submit(Job("a", "0", window, top, None, cb("a", c)))
            time.sleep(0.006)
            w.submit(Job("b", "5", window, top, None, cb("b", c)))
        time.sleep(0.6)  # a and b fall silent
        w.submit(Job("c", "0", window, 0, None, cb("c", 0)))
        assert done.wait(60)
    finally:
        w.close()
    assert all(ok for *_, ok in got)
    pairs = {c: [g for g in got if g[1] == c and g[0] in "ab"] for c in range(6)}
    batched = [c for c, (x, y) in pairs.items() if x[2] == y[2] == 2 and x[3] == y[3]]
    assert len(batched) >= 4, got  # the first round may start before b's chunk arrives
    assert [g[2] for g in got if g[0] == "c"] == [1]


def test_bench_batch_reports_both_ways(tmp_path, capsys):
    import json

    from syncavatar.cli import main
    out = tmp_path / "b.json"
    assert main(["bench", "batch", "--sizes", "1,2", "--rounds", "1", "--json", str(out), "--quiet",
                 "--plot", str(tmp_path / "b.png")]) == 0
    r = json.loads(out.read_text())
    assert set(r["sizes"]) == {"1", "2"} and (tmp_path / "b.png").stat().st_size > 0
    for row in r["sizes"].values():
        assert row["max_latent_diff"] <= 1e-4 and row["separate_chunk_ms"] > 0 and row["batched_chunk_ms"] > 0
    assert main(["bench", "batch", "--sizes", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_decode_stage_on_its_thread_gives_the_frames_inline_decoding_gives():
    """The worker's two stages (streaming.worker_process.DecodeStage): two sessions, three chunks each, denoised as
    batches and decoded on the stage's own thread come out bit-identical, chunk for chunk, to the same
    batches decoded inline; a batch that fails to decode reports an error for each of its chunks and the
    stage goes on."""
    import queue

    from engine.config import load_config
    from streaming.protocol import ChunkDone, FirstFrame
    from streaming.worker_process import DecodeStage, Denoised, _Worker
    cfg = load_config()
    w = _Worker(cfg)
    rng = np.random.default_rng(1)
    windows = [(0.1 * rng.standard_normal((w.cfg.audio_frames + 2) * 640)).astype(np.float32) for _ in range(6)]
    got = {}
    for threaded in (False, True):
        w.gens.clear()
        outq = queue.Queue()
        stage = DecodeStage(w, outq, threaded)
        for c in range(3):
            for d in w.denoise([ChunkRequest(2 * c, "a", "0", windows[2 * c], 0, None),
                                ChunkRequest(2 * c + 1, "b", "5", windows[2 * c + 1], 0, None)]):
                stage.put(d)
        bad = Denoised([90, 91], [w.gens["a"], w.gens["b"]], torch.zeros(2, 1), {"level": 0, "batch": 2})
        stage.put(bad)
        stage.put(w.denoise([ChunkRequest(6, "a", "0", windows[0], 1, None)])[0])
        stage.close()
        msgs = [outq.get_nowait() for _ in range(outq.qsize())]
        heads = {m.job: m for m in msgs if isinstance(m, FirstFrame)}
        done = [m for m in msgs if isinstance(m, ChunkDone)]
        assert len(done) == 9 and len(heads) == 7 and len(msgs) == 16  # the failed batch sent no first frame
        got[threaded] = {m.job: m for m in done}
        for job in heads:  # each chunk's first frame comes before its ChunkDone with the other three
            assert msgs.index(heads[job]) < msgs.index(got[threaded][job]) and got[threaded][job].first == 1
        assert got[threaded][90].frames is None and "error" in got[threaded][91].info
        info = got[threaded][1].info
        assert info["batch"] == 2 and info["batch_index"] == 1 and info["gen_end"] >= info["gen_start"]
        assert {"dit_ms", "decode_ms", "first_ms", "gen_ms"} <= set(info)
        got[threaded] = {j: np.concatenate([heads[j].frames, m.frames]) for j, m in got[threaded].items() if j in heads}
    alone = w.chunks([ChunkRequest(-1, "c", "0", windows[0], 0, None)])[0][0]  # all four frames at once
    w.gens.clear()
    again = w.chunks([ChunkRequest(-1, "c", "0", windows[0], 0, None)])[0][0]
    assert alone.shape[0] == 4 and np.array_equal(alone, again)
    for job in (0, 1, 2, 3, 4, 5, 6):
        assert got[False][job].shape[0] == 4 and np.array_equal(got[False][job], got[True][job]), job
    assert not np.array_equal(got[True][0], got[True][2])  # other audio, other frames


def test_keeps_up_when_a_round_fits_one_chunk_period():
    """A level is kept up when a round of one chunk per speaking session holds the worker at most 160 ms:
    pipelined, its slower stage; two speaking sessions make the round a batch of two."""
    w = _worker([[200.0, 260.0], [90.0, 150.0]], decode_ms=[120.0, 170.0], first_ms=[30.0, 50.0], pipelined=True)
    assert [w.keeps_up(lvl) for lvl in (0, 1)] == [False, True]  # max(200, 120) > 160 >= max(90, 120)
    w._speaking = {"a": 0.0, "b": 0.0}
    assert [w.keeps_up(lvl) for lvl in (0, 1)] == [False, False]  # batch of two: max(150, 170) > 160
    w.pipelined = False
    w._speaking = {}
    assert not w.keeps_up(1)  # in sequence the stages add up: 90 + 120 > 160


def test_a_level_that_decodes_every_other_frame_costs_half_the_rest():
    """decode_every 2: the first frame, then frame 2 of 4 (a third of what frames 1-3 take). Predictions,
    the hold and keeping up use that share; what such a batch teaches is scaled back to every frame."""
    w = _worker([[76.0], [76.0]], decode_ms=[145.0], first_ms=[40.0], pipelined=True, decode_every=[1, 2])
    assert w.decode_est_ms(0, 1) == pytest.approx(145.0) and w.decode_est_ms(1, 1) == pytest.approx(40 + 105 / 3)
    assert w.hold_ms(1, 1) == pytest.approx(76.0)  # the DiT is now the slower stage
    assert w.first_frame_ms(1, [1, 1]) == pytest.approx(max(152.0, 76 + 75) + 40)
    w.chunk_ms = lambda: 140.0
    assert [w.keeps_up(lvl) for lvl in (0, 1)] == [False, True]
    w.gen_ms = [221.0, 151.0]
    w._learn({"level": 1, "batch": 1, "dit_ms": 76.0, "decode_ms": 40 + 105 / 3 * 1.2, "first_ms": 40.0})
    assert w.decode_ms[0] == pytest.approx(0.8 * 145 + 0.2 * (40 + 105 * 1.2))  # as if it had decoded all


def test_a_level_with_a_cheaper_decoder_predicts_and_learns_by_its_cost():
    """[[live.levels]] decoder: a level whose decoder costs half (decode_scale 0.5, measured at start-up)
    predicts half the decoding and first frames; what it measures there moves its scale, not the model's
    decoder's estimates (a start-up measurement that got the scale wrong is corrected live)."""
    w = _worker([[76.0], [76.0]], decode_ms=[145.0], first_ms=[40.0], pipelined=True, decode_scale=[1.0, 0.5])
    assert w.decode_est_ms(0, 1) == pytest.approx(145.0) and w.decode_est_ms(1, 1) == pytest.approx(72.5)
    assert w.first_est_ms(1, 1) == pytest.approx(20.0)
    assert w.hold_ms(1, 1) == pytest.approx(76.0) and w.hold_ms(0, 1) == pytest.approx(145.0)
    assert w.first_frame_ms(1, [1]) == pytest.approx(76 + 20)
    w.chunk_ms = lambda: 140.0
    assert [w.keeps_up(lvl) for lvl in (0, 1)] == [False, True]
    w.gen_ms = [221.0, 148.0]
    w._learn({"level": 1, "batch": 1, "dit_ms": 76.0, "decode_ms": 101.5, "first_ms": 24.0})
    assert w.decode_scale[1] == pytest.approx(0.8 * 0.5 + 0.2 * 0.7)  # 101.5 of the model's 145
    assert (w.first_ms, w.decode_ms) == ([40.0], [145.0])
    w._learn({"level": 0, "batch": 1, "dit_ms": 76.0, "decode_ms": 150.0, "first_ms": 45.0})
    assert w.first_ms[0] == pytest.approx(0.8 * 40 + 0.2 * 45) and w.decode_ms[0] == pytest.approx(0.8 * 145 + 0.2 * 150)


def test_a_level_with_its_own_decoder_draws_its_frames_with_it(speech_wav, tmp_path):
    """[[live.levels]] decoder = a decoder file of the model's latents: that level's frames are that
    decoder's (as load_decoder draws them), the other levels' the model's own."""
    from dataclasses import replace

    from engine.config import LevelConfig, load_config
    from engine.generator import ChunkGenerator, load_avatar
    from engine.media import load_audio
    from engine.model.autoencoder import FrameAutoencoder
    from engine.model.avatar import load_decoder, save_decoder
    from streaming.worker_process import _Worker
    cfg = load_config()
    top = cfg.live.levels[-1]
    w0 = _Worker(cfg)
    lite = FrameAutoencoder(replace(w0.model.ae.cfg, decoder_widths=(16, 16, 32, 64, 128))).eval()
    lite.load_state_dict({k: v for k, v in w0.model.ae.state_dict().items() if not k.startswith("decoder.")}, strict=False)
    torch.nn.init.normal_(lite.decoder.head.weight, std=0.05)  # draws something other than the reference
    save_decoder(lite, tmp_path / "lite.safetensors")
    cfg.live.levels = [LevelConfig(top.cache, top.schedule, top.guidance),
                       LevelConfig(top.cache, top.schedule, top.guidance, decoder=str(tmp_path / "lite.safetensors"))]
    w = _Worker(cfg)
    assert w.decoders[0] is None and w.decoders[1] is not None
    assert "decoder lite" in cfg.live.levels[1].name()
    speech = load_audio(speech_wav)
    n = (w.cfg.audio_frames + 2) * 640
    d = w.denoise([ChunkRequest(0, "a", "0", speech[:n], 0, None)])[0]
    full = w.decode(d)[0][0]
    d.info = d.info | {"level": 1}
    own = w.decode(d)[0][0]
    gen = ChunkGenerator(w.model, load_avatar("0"), decoder=load_decoder(tmp_path / "lite.safetensors", w.model))
    with torch.no_grad():
        want = gen.decoder.to_uint8(gen.decoder.decode(d.z[0], gen.ref_feats))
    assert own.shape == full.shape == (4, 128, 128, 3)
    assert np.abs(own.astype(int) - want).max() <= 1
    assert np.abs(own.astype(int) - full).mean() > 1


def test_a_level_decoding_every_other_frame_shows_each_twice(speech_wav):
    """[[live.levels]] decode_every = 2: frames 0 and 2 decoded (as decoding all four gives them, up to
    rounding), each shown twice; a value that does not divide the chunk's frames stops the worker at start."""
    from engine.config import LevelConfig, load_config
    from engine.media import load_audio
    from streaming.worker_process import _Worker
    cfg = load_config()
    top = cfg.live.levels[-1]
    cfg.live.levels = [LevelConfig(top.cache, top.schedule, top.guidance, decode_every=k) for k in (1, 2)]
    w = _Worker(cfg)
    speech = load_audio(speech_wav)
    n = (w.cfg.audio_frames + 2) * 640
    for start in range(0, len(speech) - n, 4 * 640):  # chunk after chunk: the mouth moves within some
        d = w.denoise([ChunkRequest(0, "a", "0", speech[start:start + n], 0, None)])[0]
        full = w.decode(d)[0][0]
        if np.abs(full[1].astype(int) - full[0]).max() > 8:
            break
    assert np.abs(full[1].astype(int) - full[0]).max() > 8, "no chunk whose frames 0 and 1 differ"
    d.info = d.info | {"level": 1}
    half = w.decode(d)[0][0]
    assert half.shape == full.shape == (4, 128, 128, 3)
    assert np.array_equal(half[0], half[1]) and np.array_equal(half[2], half[3])
    assert np.abs(half[::2].astype(int) - full[::2]).max() <= 1  # frames 1 and 3 are 0 and 2 again
    cfg.live.levels[1].decode_every = 3
    with pytest.raises(ValueError, match="decode_every = 3 must divide"):
        _Worker(cfg)


def test_a_level_with_shared_guidance_runs_its_guided_steps_shared(speech_wav):
    """[[live.levels]] share_guidance = true: every step of a guided chunk at that level runs its heavy blocks
    once for the pair (SyncCache's stats), and its latents differ from the same plan unshared; at a level
    without guidance nothing is shared."""
    from engine.config import LevelConfig, load_config
    from engine.media import load_audio
    from streaming.worker_process import _Worker
    cfg = load_config()
    plan = cfg.live.levels[1]
    cfg.live.levels = [LevelConfig(plan.cache, plan.schedule, 3.0, share_guidance=True),
                       LevelConfig(plan.cache, plan.schedule, 3.0),
                       LevelConfig(plan.cache, plan.schedule, 1.0, share_guidance=True)]
    assert [lvl.name().endswith(", shared guidance") for lvl in cfg.live.levels] == [True, False, False]
    w = _Worker(cfg)
    window = load_audio(speech_wav)[:(w.cfg.audio_frames + 2) * 640]
    z, shared = [], []
    for level in range(3):
        d = w.denoise([ChunkRequest(level, f"s{level}", "0", window, level, None)])[0]
        z.append(d.z)
        shared.append(w.handle.stats()["shared_steps"])
    assert shared == [cfg.live.steps, 0, 0]
    assert not torch.allclose(z[0], z[1], atol=1e-3)
