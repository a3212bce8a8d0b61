"""Autoencoder face_psnr (true frames encoded and decoded, every 4th frame) per clip of a corpus, for one or
more weight files: the quick check used between decoder passes (the full `syncavatar eval --corpus` report
has the same column, `ae_face_psnr`, next to the generated video's). WEIGHTS@DECODER decodes with a second
decoder file of those weights' latents (e.g. engine/weights/decoder-lite.safetensors).

    .venv/bin/python docs/model/ae_face_psnr.py engine/weights/avatar.safetensors,runs/dec5/avatar.safetensors data/dev
"""
import glob
import json
import sys

import numpy as np
import torch

from engine.model.avatar import load_decoder, load_model
from engine.picture import face_psnr
from engine.report import ae_roundtrip

torch.set_num_threads(2)
weights, corpus = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "data/dev"
files = sorted(glob.glob(f"{corpus}/clip_*.npz"))
for w in weights.split(","):
    path, _, dec = w.partition("@")
    model = load_model(path)
    decoder = load_decoder(dec, model) if dec else None
    res = []
    for f in files:
        clip = np.load(f)
        ident = json.loads(str(clip["meta"]))["identity"]
        res.append(face_psnr(ae_roundtrip(model, clip["frames"][::4], clip["ref"], decoder=decoder), ident)["median"])
    print(f"{w}: median {np.median(res):.2f} min {min(res):.2f} |", " ".join(f"{r:.1f}" for r in res), flush=True)
