"""A picture of what the lite decoder gives up: for a few clips, the true frames (top row), the model's
decoder (middle) and a second decoder file (bottom), both decoding the true frames' latents (autoencoder
round trip), at the clip's three most open and three most closed mouths.

    .venv/bin/python docs/model/lite_sheet.py engine/weights/decoder-lite.safetensors data/heldout 3 OUT.png
"""
import glob
import sys

import matplotlib
import numpy as np
import torch

from engine.model.avatar import load_decoder, load_model
from engine.report import ae_roundtrip

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path, corpus, n, out, per_clip=6):
    torch.set_num_threads(2)
    model = load_model()
    lite = load_decoder(path, model)
    rows = []
    for f in sorted(glob.glob(f"{corpus}/clip_*.npz"))[:n]:
        clip = np.load(f)
        order = np.argsort(-clip["openness"][:len(clip["frames"])])
        pick = np.sort(np.concatenate([order[:per_clip // 2], order[-per_clip // 2:]]))
        true = clip["frames"][pick]
        for frames in (true, ae_roundtrip(model, true, clip["ref"]), ae_roundtrip(model, true, clip["ref"], decoder=lite)):
            rows.append(np.concatenate(list(frames), 1))
    plt.imsave(out, np.concatenate(rows, 0))  # pixel for pixel
    print(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
