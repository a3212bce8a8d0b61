"""Corpus: viseme mapping, mouth tracks, portraits, determinism, held-out splits."""
import numpy as np

from engine.data import corpus, portraits
from engine.data.visemes import VISEMES, mouth_track, viseme


def test_viseme_mapping():
    assert viseme("p") == viseme("b") == viseme("m") == "closed"
    assert viseme("f") == "labiodental"
    assert viseme("aI") == viseme("a") == viseme("A:") == "open"
    assert viseme("u:") == "close_round" and viseme("oU") == "mid_round"
    assert viseme("_:") == viseme("_") == "rest"
    assert viseme("tS") == "postalveolar"
    assert VISEMES[viseme("a")][0] > VISEMES[viseme("@")][0] > VISEMES[viseme("p")][0]


def test_mouth_track_follows_phonemes():
    # "ma" held then "pa": the mouth opens on the vowels and closes on the pause
    ph = [("_", 0.0, 0.3), ("m", 0.3, 0.38), ("A:", 0.38, 0.7), ("p", 0.7, 0.76), ("a", 0.76, 1.0), ("_", 1.0, 1.6)]
    op, ro = mouth_track(ph, 40)
    assert op.shape == ro.shape == (40,)
    assert op.min() >= 0 and op.max() <= 1
    assert op[:5].max() < 0.1  # silence before speech
    assert op[12:17].mean() > 0.7  # during the long A:
    assert op[-5:].max() < 0.1  # silence after


def test_portraits_distinct_and_masked():
    a, pa, fa = portraits.reference(0)
    b, _, _ = portraits.reference(1)
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b).mean() > 10  # identities differ
    assert fa.sum() > 0 and (fa & ~pa).sum() < 0.15 * fa.sum()  # face mask (a little dilated) on the person
    assert pa[0].sum() < 128  # top row mostly background
    idn = portraits.identity(5)
    closed, _, _ = portraits.draw(idn, openness=0.0)
    opened, _, _ = portraits.draw(idn, openness=1.0)
    diff = np.abs(closed.astype(int) - opened).sum(-1) > 30
    rows, cols = np.nonzero(diff)
    assert 60 <= rows.mean() <= 100 and 40 <= cols.mean() <= 88  # only the mouth region changes


def test_corpus_deterministic(tmp_path):
    corpus.build_corpus(tmp_path / "a", 2, seed=5, progress=False)
    corpus.build_corpus(tmp_path / "b", 2, seed=5, progress=False)
    for i in range(2):
        with np.load(tmp_path / "a" / f"clip_{i:05d}.npz") as x, np.load(tmp_path / "b" / f"clip_{i:05d}.npz") as y:
            assert x.files == y.files
            for k in x.files:
                assert np.array_equal(x[k], y[k]), k
            T = len(x["openness"])
            assert x["frames"].shape == (T, 128, 128, 3)
            assert abs(len(x["audio"]) / 16000 * 25 - T) <= 1
            assert x["face_mask"].shape == (T, 128, 128)


def test_heldout_split_is_disjoint():
    train = [corpus.make_clip(0, i, "train") for i in range(2)]
    held = corpus.make_clip(0, 0, "heldout-id")
    import json
    m = json.loads(str(held["meta"]))
    assert m["identity"] in portraits.HELDOUT_IDENTITIES
    assert m["voice"].split("+")[0] in corpus.HELDOUT_LANGS
    assert m["text"] in corpus.HELDOUT_SENTENCES
    for c in train:
        mt = json.loads(str(c["meta"]))
        assert mt["identity"] in portraits.TRAIN_IDENTITIES
        assert mt["voice"].split("+")[0] not in corpus.HELDOUT_LANGS
        assert all(s not in mt["text"] for s in corpus.HELDOUT_SENTENCES)
