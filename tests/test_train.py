"""Training pipeline smoke test on a tiny corpus: every stage runs, checkpoints, resumes and exports."""
import csv

import torch

from engine import train
from engine.data.corpus import build_corpus
from engine.model.avatar import load_model


def test_train_stages_resume_and_export(tmp_path):
    corpus, run = tmp_path / "corpus", tmp_path / "run"
    build_corpus(corpus, 2, seed=3, progress=False)
    torch.set_num_threads(1)
    train.train_ae(corpus, run, steps=2, batch=2, preset="ref-XS")
    train.train_ae(corpus, run, steps=3, batch=2, preset="ref-XS")  # resumes at step 2
    rows = list(csv.DictReader(open(run / "ae_loss.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    train.encode_corpus(corpus, run, preset="ref-XS")
    train.train_dit(corpus, run, steps=2, batch=2, preset="ref-XS", audio_warmup=2, self_motion=1.0)
    train.export(run, run / "avatar.safetensors", preset="ref-XS")
    model = load_model(run / "avatar.safetensors")
    assert model.cfg.hidden == 192
    # a later session continues from the shipped file (checkpoints stay out of git)
    run2 = tmp_path / "run2"
    train.encode_corpus(corpus, run2, preset="ref-XS", init=run / "avatar.safetensors")
    cont = train.train_dit(corpus, run2, steps=1, batch=2, lr=0.0, preset="ref-XS", init=run / "avatar.safetensors")
    for (k, a), b in zip(model.dit.state_dict().items(), cont.dit.state_dict().values()):
        assert torch.allclose(a, b.float(), atol=1e-3), k  # lr 0: still the exported weights (fp16 storage)
