"""Where the autoencoder's face error comes from (issue 11), on the dev split:

1. probe: how well the frozen encoder's latent carries the frame's parameters (ridge regression from the
   latent to blink, head offset, mouth openness and rounding; R^2 on held-back frames);
2. regions: the autoencoder's squared error against the closest clean render (engine/picture.py's fit),
   split into the eye window, the mouth window and the rest of the face, for frames with open eyes;
3. warp ceiling: the reference portrait warped by the true head offset (what a decoder that only moves the
   reference could draw), PSNR in the eye window and the rest of the face, for closed-mouth open-eye frames.

usage: python docs/model/diagnose_picture.py [WEIGHTS] [CORPUS=data/dev] [PROBE_CORPUS=data/heldout]
"""
import glob
import json
import sys

import numpy as np
import torch

from engine import picture as P
from engine.model.autoencoder import warp
from engine.model.avatar import DEFAULT_WEIGHTS, load_model
from engine.report import ae_roundtrip

torch.set_num_threads(2)


def _clips(corpus):
    for f in sorted(glob.glob(f"{corpus}/clip_*.npz")):
        z = np.load(f)
        yield z, P.as_identity(json.loads(str(z["meta"]))["identity"])


def _masks(idn, dx, dy):
    face = P.face_region(idn, dx, dy)
    out = {}
    for k, (r0, r1, c0, c1) in (("mouth", P.mouth_window(idn, dx, dy)), ("eyes", P.eye_window(idn, dx, dy))):
        w = np.zeros(face.shape, bool)
        w[r0:r1, c0:c1] = True
        out[k] = w & face
    out["rest"] = face & ~out["mouth"] & ~out["eyes"]
    return face, out


def _db(mse):
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


def probe(model, corpora):
    X, Y = [], []
    for corpus in corpora:
        for z, _ in _clips(corpus):
            with torch.no_grad():
                X.append(model.ae.encode(model.ae.to_input(z["frames"])).flatten(1).numpy())
            Y.append(np.column_stack([z["blink"], z["sway"], z["openness"], z["rounding"]]))
    X, Y = np.concatenate(X), np.concatenate(Y)
    idx = np.random.default_rng(0).permutation(len(X))
    tr, te = idx[: len(X) * 3 // 4], idx[len(X) * 3 // 4:]
    W = np.linalg.solve(X[tr].T @ X[tr] + np.eye(X.shape[1]), X[tr].T @ (Y[tr] - Y[tr].mean(0)))
    P_ = X[te] @ W + Y[tr].mean(0)
    r2 = 1 - ((P_ - Y[te]) ** 2).sum(0) / ((Y[te] - Y[te].mean(0)) ** 2).sum(0)
    return dict(zip(("blink", "dx", "dy", "openness", "rounding"), np.round(r2, 3).tolist()))


def regions(model, corpus, stride=6):
    err = {"mouth": 0.0, "eyes": 0.0, "rest": 0.0}
    px = dict.fromkeys(err, 0)
    for z, idn in _clips(corpus):
        idx = [i for i in range(0, len(z["frames"]), stride) if z["blink"][i] < 0.3]
        for fr in ae_roundtrip(model, z["frames"][idx], z["ref"]):
            p, render, _ = P.fit_frame(fr, idn)
            e = ((render.astype(np.float32) - fr.astype(np.float32)) ** 2).mean(-1)
            _, masks = _masks(idn, p["dx"], p["dy"])
            for k, m in masks.items():
                err[k] += float(e[m].sum())
                px[k] += int(m.sum())
    total = sum(err.values())
    return {k: {"error_share": round(err[k] / total, 2), "pixel_share": round(px[k] / sum(px.values()), 2),
                "psnr": round(_db(err[k] / px[k]), 1)} for k in err}


def warp_ceiling(corpus, stride=5):
    out = {"eyes": [], "rest": []}
    for z, idn in _clips(corpus):
        ref = torch.from_numpy(z["ref"]).permute(2, 0, 1)[None].float()
        for i in range(0, len(z["frames"]), stride):
            if z["blink"][i] > 0.05 or z["openness"][i] > 0.05:
                continue
            dx, dy = (float(v) for v in z["sway"][i])
            flow = torch.zeros(1, 2, *ref.shape[-2:])
            flow[:, 0], flow[:, 1] = -2 * dx / ref.shape[-1], -2 * dy / ref.shape[-2]
            moved = warp(ref, flow)[0].permute(1, 2, 0).numpy()
            truth = z["frames"][i].astype(np.float32)
            _, masks = _masks(idn, dx, dy)
            for k in out:
                out[k].append(_db(((moved - truth) ** 2)[masks[k]].mean()))
    return {k: round(float(np.median(v)), 1) for k, v in out.items()}


if __name__ == "__main__":
    weights = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_WEIGHTS
    corpus = sys.argv[2] if len(sys.argv) > 2 else "data/dev"
    probe_corpus = sys.argv[3] if len(sys.argv) > 3 else "data/heldout"
    m = load_model(weights)
    print(json.dumps({"latent_probe_r2": probe(m, [probe_corpus, corpus]), "ae_error_by_region": regions(m, corpus),
                      "warp_ceiling_psnr": warp_ceiling(corpus)}, indent=1))
