"""Training pipeline smoke test on a tiny corpus: every stage runs, checkpoints, resumes and exports."""
import csv

import numpy as np
import torch

from engine import train
from engine.data.corpus import build_corpus
from engine.model.avatar import load_decoder, load_model


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
    # the decoder stage: a windowed 128-px stage, faces the corpus never shows, resumes from its checkpoint
    run3 = tmp_path / "run3"
    dec = train.train_decoder(corpus, run3, run / "avatar.safetensors", steps=1, batch=3, fine=8,
                              fine_window=(24, 96, 28, 100), portrait_share=0.9, blink_share=0.5)
    dec = train.train_decoder(corpus, run3, run / "avatar.safetensors", steps=2, batch=3, fine=8,
                              fine_window=(24, 96, 28, 100), portrait_share=0.9, blink_share=0.5)
    assert [int(r["step"]) for r in csv.DictReader(open(run3 / "decoder_loss.csv"))] == [1, 2]
    assert train.plot_losses(tmp_path / "empty") is None
    assert train.plot_losses(run3) == run3 / "loss.png" and (run3 / "loss.png").stat().st_size > 1000
    shipped = load_model(run3 / "avatar.safetensors")
    assert shipped.ae.cfg.fine == 8 and tuple(shipped.ae.cfg.fine_window) == (24, 96, 28, 100)
    for (k, a), b in zip(model.dit.state_dict().items(), shipped.dit.state_dict().values()):
        assert torch.allclose(a, b.float(), atol=1e-3), k  # the decoder stage leaves the DiT alone
    # a second, narrower decoder of the same latents, from scratch beside the first one's reference encoder
    run4 = tmp_path / "run4"
    train.train_decoder(corpus, run4, run3 / "avatar.safetensors", steps=1, batch=2, widths=(16, 16, 32, 64, 128))
    lite = load_decoder(run4 / "decoder.safetensors", shipped)
    assert lite.cfg.decoder_widths == (16, 16, 32, 64, 128) and lite.encoder is shipped.ae.encoder
    assert sum(p.numel() for p in lite.decoder.parameters()) < sum(p.numel() for p in shipped.ae.decoder.parameters())
    assert (run4 / "decoder.safetensors").stat().st_size < (run4 / "avatar.safetensors").stat().st_size / 4
    faces = train.PortraitSampler(np.random.default_rng(0), frames=4).batch(2)
    assert faces["frames"].shape == (2, 4, 128, 128, 3) and faces["ref_img"].shape == (2, 128, 128, 3)
    assert faces["face_px"].shape == (2, 4, 128, 128) and faces["face_px"].any()
