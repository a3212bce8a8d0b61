"""Where gt_corr is lost (issue 2), on a corpus split (the dev split, never the test clips):

    .venv/bin/python docs/model/diagnose_gt_corr.py [WEIGHTS] [CORPUS]

Per clip, gt_corr (the expert's openness of frames vs the true openness) of
  ae:  the true frames through the autoencoder (the ceiling the latent allows),
  enc: the audio encoder's own openness head, chunk by chunk (a linear read-out of the DiT's audio tokens),
  tf:  the DiT with the true previous frames as motion tokens (teacher-forced),
  ar:  the DiT chunk after chunk from its own frames, as render and the live engine run it,
with the sampler defaults (steps, guidance, start noise). Results of stop 9 are in engine/weights/README.md.
"""
import glob
import sys

import numpy as np
import torch

from engine.generator import Avatar, ChunkGenerator
from engine.lipsync import evaluate_arrays, pearson
from engine.model.avatar import load_model

torch.set_num_threads(2)
weights = sys.argv[1] if len(sys.argv) > 1 else "engine/weights/avatar.safetensors"
corpus = sys.argv[2] if len(sys.argv) > 2 else "data/dev"
model = load_model(weights).eval()
cfg = model.cfg
res = {"ae": [], "enc": [], "tf": [], "ar": []}
for f in sorted(glob.glob(f"{corpus}/clip_*.npz")):
    c = dict(np.load(f))
    T = len(c["openness"])
    av = Avatar("x", c["ref"], c["ref_person_mask"].astype(bool), c["ref_face_mask"].astype(bool))
    audio = torch.from_numpy(c["audio"].astype(np.float32))
    gen = ChunkGenerator(model, av)
    with torch.no_grad():
        z = torch.cat([model.ae.encode(model.ae.to_input(c["frames"][i:i + 32])) for i in range(0, T, 32)])
        rec = np.concatenate([np.asarray(model.ae.to_uint8(model.ae.decode(z[i:i + 32], gen.ref_feats)))
                              for i in range(0, T, 32)])
        enc = np.concatenate([model.audio.frame_openness(gen.audio_tokens(audio, s))[0, cfg.lookback:cfg.lookback + cfg.frames].numpy()
                              for s in range(0, T, cfg.frames)])[:T]
        ar = [gen.chunk(audio, s) for s in range(0, T, cfg.frames)]
        gen.reset()
        zp = torch.cat([gen.ref_latent.repeat(cfg.motion_frames, 1, 1, 1), z])
        tf = []
        for s in range(0, T, cfg.frames):
            gen.motion = zp[s:s + cfg.motion_frames][None]
            tf.append(gen.chunk(audio, s))
    res["ae"].append(evaluate_arrays(rec, c["audio"], c["openness"])["gt_corr"])
    res["enc"].append(pearson(enc, c["openness"]))
    for k, out in (("tf", tf), ("ar", ar)):
        res[k].append(evaluate_arrays(np.concatenate([np.asarray(x) for x in out])[:T], c["audio"], c["openness"])["gt_corr"])
    print(f, {k: round(float(v[-1]), 3) for k, v in res.items()}, flush=True)
print("mean", {k: round(float(np.mean(v)), 3) for k, v in res.items()})
