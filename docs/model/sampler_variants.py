"""gt_corr and sync_conf on a corpus split (dev) for sampler settings GUIDANCE/START_NOISE/STEPS:

    .venv/bin/python docs/model/sampler_variants.py engine/weights/avatar.safetensors 3/0.7/20,4/0.7/20,3/0.5/20,4/0.5/20,3/0.3/20

Stop 9 on data/dev (gt_corr / sync_conf): 3/0.7 0.796 (diagnose_gt_corr.py), 4/0.7 0.804 / 0.851, 3/0.5 0.809 / 0.866,
4/0.5 0.808 / 0.855, 3/0.3 0.805 / 0.866.
"""
import glob
import sys

import numpy as np
import torch

from engine.generator import Avatar, render_frames
from engine.lipsync import evaluate_arrays
from engine.model.avatar import load_model

torch.set_num_threads(2)
model = load_model(sys.argv[1]).eval()
files = sorted(glob.glob(f"{sys.argv[3] if len(sys.argv) > 3 else 'data/dev'}/clip_*.npz"))
for var in sys.argv[2].split(","):
    g, ns, steps = (float(x) for x in var.split("/"))
    rows = []
    for f in files:
        c = dict(np.load(f))
        av = Avatar("x", c["ref"], c["ref_person_mask"].astype(bool), c["ref_face_mask"].astype(bool))
        frames, _ = render_frames(model, av, c["audio"], steps=int(steps), guidance=g, noise_scale=ns)
        r = evaluate_arrays(frames[:len(c["openness"])], c["audio"], c["openness"])
        rows.append((r["gt_corr"], r["sync_conf"]))
    a = np.array(rows)
    print(f"guidance {g}, start noise {ns}, {int(steps)} steps: gt_corr {a[:, 0].mean():.3f} (min {a[:, 0].min():.2f}), "
          f"sync_conf {a[:, 1].mean():.3f}; per clip {[round(float(x), 2) for x in a[:, 0]]}", flush=True)
