"""Model-card evaluation on held-out corpus clips: lip sync, identity, seams, speed; plots.

`syncavatar eval --corpus data/heldout --json report.json [--clips N] [--steps N] [--sheet sheet.png]`
renders every clip's (augmented, microphone-like) audio with the clip's avatar, chunk by chunk as the
live engine does, and measures:
- `gt_corr`: Pearson of the mouth openness read from the generated video vs the true openness;
- `sync_conf`, `offset_frames`: the lip-sync expert's peak correlation video vs speech, and its lag;
- `truth_sync_conf`: the same on the corpus's own ground-truth frames (is the expert fit to judge?);
- `bg_psnr`: PSNR of generated frames vs the reference portrait outside the person (identity kept);
- `seam_ratio`: mean |frame-to-frame difference| across chunk boundaries over that inside chunks;
- `face_psnr` (and `face_psnr_min`): PSNR of the face against the closest clean render of the avatar
  (engine/picture.py), median (lowest) over every PICTURE_STRIDE-th frame: noise, blur, doubled eyes;
- `truth_face_psnr`: the same on the corpus's true frames (the fit's ceiling, ~60 dB);
- `ae_face_psnr`: the same on the true frames encoded and decoded by the autoencoder with the clip's
  reference (what the latent space and decoder alone cost the picture, before any DiT);
- `rtf`: generation time / audio duration.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PICTURE_STRIDE = 4  # face_psnr on every 4th frame: a few s per 100-frame clip for all three; medians within
# ~0.5 dB of every frame's on held-out clips


def _psnr(a, b, mask):
    """PSNR in dB between uint8 images over mask pixels."""
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    m = mask[..., None].repeat(3, -1)
    mse = d[np.broadcast_to(m, d.shape)].mean()
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


def background_mask(person_masks: np.ndarray, ref_person_mask: np.ndarray, margin: int = 3) -> np.ndarray:
    """Pixels that are background in the reference and every truth frame, shrunk by margin px."""
    from scipy.ndimage import binary_dilation
    person = person_masks.astype(bool).any(0) | ref_person_mask.astype(bool)
    return ~binary_dilation(person, iterations=margin)


def seam_ratio(frames: np.ndarray, chunk: int) -> float:
    """Mean abs frame difference at chunk boundaries / inside chunks."""
    d = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean((1, 2, 3))  # d[i] = |f[i+1] - f[i]|
    idx = np.arange(len(d))
    at = (idx + 1) % chunk == 0
    if not at.any() or at.all():
        return float("nan")
    return float(d[at].mean() / max(d[~at].mean(), 1e-6))


def ae_roundtrip(model, frames: np.ndarray, ref: np.ndarray, batch: int = 32, decoder=None) -> np.ndarray:
    """Frames uint8 [T,128,128,3] encoded and decoded by model.ae (or a second decoder of its latents,
    engine.model.avatar.load_decoder) with reference ref uint8 [128,128,3] (as the generator decodes)
    -> uint8 [T,128,128,3]."""
    import torch
    ae = decoder or model.ae
    out = []
    with torch.no_grad():
        ref_feats = ae.reference(ae.to_input(ref)[None])
        for i in range(0, len(frames), batch):
            out.append(ae.to_uint8(ae.decode(ae.encode(ae.to_input(frames[i:i + batch])), ref_feats)))
    return np.concatenate(out) if out else np.zeros((0, *frames.shape[1:]), np.uint8)


def picture_metrics(model, clip: dict, frames: np.ndarray, stride: int = PICTURE_STRIDE) -> dict:
    """face_psnr of generated frames, of the clip's true frames and of those through the autoencoder."""
    from engine.picture import face_psnr
    ident = json.loads(str(clip["meta"]))["identity"]
    truth = clip["frames"][:len(frames)][::stride]
    gen = face_psnr(frames, ident, stride)
    return {"face_psnr": gen["median"], "face_psnr_min": gen["min"],
            "truth_face_psnr": face_psnr(truth, ident)["median"],
            "ae_face_psnr": face_psnr(ae_roundtrip(model, truth, clip["ref"]), ident)["median"]}


def evaluate_clip(model, clip: dict, steps=None, seed=0, picture_stride=PICTURE_STRIDE) -> tuple[dict, np.ndarray]:
    """Render one corpus clip from its audio and avatar -> (metrics, generated frames)."""
    from engine.generator import Avatar, render_frames
    from engine.lipsync import evaluate_arrays
    meta = json.loads(str(clip["meta"]))
    avatar = Avatar(str(meta["identity"]), clip["ref"], clip["ref_person_mask"].astype(bool),
                    clip["ref_face_mask"].astype(bool))
    kwargs = {"steps": steps} if steps else {}
    frames, stats = render_frames(model, avatar, clip["audio"], seed=seed, **kwargs)
    truth = clip["openness"]
    T = min(len(frames), len(truth))
    gen = evaluate_arrays(frames[:T], clip["audio"], truth[:T])
    own = evaluate_arrays(clip["frames"][:T], clip["audio"], truth[:T])
    bg = background_mask(clip["person_mask"], clip["ref_person_mask"])
    res = {"clip": meta["index"], "identity": meta["identity"], "voice": meta["voice"], "text": meta["text"],
           "frames": T, "gt_corr": gen["gt_corr"], "sync_conf": gen["sync_conf"],
           "offset_frames": gen["offset_frames"], "env_corr": gen["env_corr"],
           "truth_sync_conf": own["sync_conf"], "truth_offset_frames": own["offset_frames"],
           "truth_gt_corr": own["gt_corr"],
           "bg_psnr": float(np.mean([_psnr(f, clip["ref"], bg) for f in frames[:T]])),
           "seam_ratio": seam_ratio(frames[:T], model.cfg.frames),
           **picture_metrics(model, clip, frames[:T], picture_stride),
           "rtf": stats["rtf"], "dit_ms": stats["dit_ms"], "total_ms": stats["total_ms"],
           "audio_s": stats["audio_s"], "steps": stats["steps"]}
    return res, frames


SUMMARY_KEYS = ("gt_corr", "sync_conf", "offset_frames", "env_corr", "truth_sync_conf", "bg_psnr",
                "seam_ratio", "face_psnr", "truth_face_psnr", "ae_face_psnr", "rtf")


def summarise(rows: list[dict]) -> dict:
    out = {"clips": len(rows)}
    for k in SUMMARY_KEYS:
        v = np.array([r[k] for r in rows], np.float64)
        out[k] = {"mean": float(np.nanmean(v)), "median": float(np.nanmedian(v)), "min": float(np.nanmin(v)),
                  "max": float(np.nanmax(v))}
    out["abs_offset_le_1"] = float(np.mean([abs(r["offset_frames"]) <= 1 for r in rows]))
    return out


def model_stats(model) -> dict:
    """Parameter counts per part, tokens per chunk and DiT FLOPs per denoising step (torch's counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    cfg = model.cfg
    cond = model.dit.prepare(torch.zeros(1, cfg.latent_channels, cfg.latent_size, cfg.latent_size),
                             torch.zeros(1, cfg.motion_frames, cfg.latent_channels, cfg.latent_size, cfg.latent_size),
                             torch.zeros(1, cfg.audio_frames * 2, cfg.audio_dim), torch.ones(1, 128, 128))
    x = torch.zeros(1, cfg.frames, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.dit(x, torch.ones(1), cond)
    params = {name: sum(p.numel() for p in part.parameters()) for name, part in
              (("autoencoder", model.ae), ("audio_encoder", model.audio), ("dit", model.dit))}
    return {"params": params | {"total": sum(params.values())},
            "dit_gflops_per_step": round(fc.get_total_flops() / 1e9, 3),
            "tokens_per_chunk": cond.context.shape[1] + cfg.frames * cfg.tokens_per_frame,
            "frames_per_chunk": cfg.frames, "hidden": cfg.hidden, "depth": cfg.depth,
            "audio_blocks_after": list(cfg.audio_after)}


def evaluate_corpus(corpus_dir, model=None, clips=None, steps=None, sheet=None, progress=True) -> dict:
    """Evaluate on (the first `clips` of) a held-out corpus; optionally draw a contact sheet."""
    from tqdm import tqdm

    from engine.model.avatar import load_model
    model = model or load_model()
    files = sorted(Path(corpus_dir).glob("clip_*.npz"))[:clips]
    if not files:
        raise FileNotFoundError(f"no clip_*.npz in {corpus_dir}")
    rows, shown = [], []
    for f in tqdm(files, desc="eval", unit="clip", disable=not progress):
        with np.load(f) as z:
            clip = {k: z[k] for k in z.files}
        res, frames = evaluate_clip(model, clip, steps)
        rows.append(res)
        if len(shown) < 4:
            shown.append((frames, clip["frames"][:len(frames)], clip["openness"][:len(frames)]))
    report = {"corpus": str(corpus_dir), "summary": summarise(rows), "model": model_stats(model), "clips": rows}
    if sheet:
        contact_sheet(shown, sheet)
        report["sheet"] = str(sheet)
    return report


def contact_sheet(shown, path, per_row=8):
    """Rows of generated frames (most open to most closed mouth) above the true frames."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = []
    for gen, true, op in shown:
        order = np.argsort(-op)
        pick = np.concatenate([order[:per_row // 2], order[-per_row // 2:]])
        rows.append(np.concatenate(list(gen[pick]), 1))
        rows.append(np.concatenate(list(true[pick]), 1))
    img = np.concatenate(rows, 0)
    fig = plt.figure(figsize=(img.shape[1] / 100, img.shape[0] / 100), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(img)
    ax.axis("off")
    fig.savefig(path)
    plt.close(fig)


def loss_plot(curves: dict, path):
    """Loss curves {title: path of a <stage>_loss.csv} -> PNG, one panel each."""
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (s, csv_path) in zip(axes[0], curves.items()):
        with open(csv_path) as f:
            rows = list(csv.DictReader(f))
        step = np.array([float(r["step"]) for r in rows])
        loss = np.array([float(r["loss"]) for r in rows])
        k = max(1, len(loss) // 100)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(step, loss, alpha=0.25, lw=0.5)
        ax.plot(step[k - 1:], smooth, lw=1.5)
        ax.set_title(s)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
