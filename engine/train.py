"""Training of the reference model, in stages, resumable: `ae` (frame autoencoder), `latents` (encode the
corpus once), `dit` (audio encoder + DiT with flow matching), `export` (shipped safetensors).

Every stage checkpoints to RUN/<stage>.pt every few hundred steps and resumes from it; losses go to
RUN/<stage>_loss.csv and a progress bar shows the running loss.
"""
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.data import portraits
from engine.model.audio_encoder import audio_window
from engine.model.avatar import AvatarModel, save_decoder, save_model
from engine.model.dit import PRESETS
from engine.sampler import DEFAULT_GUIDANCE


def load_corpus(corpus_dir, keys=("frames", "audio", "openness", "ref", "face_mask", "ref_face_mask",
                                  "ref_person_mask")):
    """All clips of a corpus dir as a list of dicts of numpy arrays."""
    files = sorted(Path(corpus_dir).glob("clip_*.npz"))
    if not files:
        raise FileNotFoundError(f"no clip_*.npz in {corpus_dir}")
    clips = []
    for f in tqdm(files, desc="load corpus", unit="clip"):
        with np.load(f) as z:
            clips.append({k: z[k] for k in keys if k in z.files} | {"name": f.stem})
    return clips


class Checkpointer:
    """Save/resume model + optimiser state and append losses to a CSV."""

    def __init__(self, run_dir, stage):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{stage}.pt"
        self.log = self.dir / f"{stage}_loss.csv"

    def resume(self, modules: dict, opt):
        if not self.path.exists():
            return 0
        state = torch.load(self.path, weights_only=False)
        for name, m in modules.items():
            m.load_state_dict(state[name])
        opt.load_state_dict(state["opt"])
        print(f"resumed {self.path} at step {state['step']}")
        return state["step"]

    def save(self, modules: dict, opt, step):
        state = {name: m.state_dict() for name, m in modules.items()} | {"opt": opt.state_dict(), "step": step}
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)

    def write(self, rows):
        new = not self.log.exists()
        with open(self.log, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "loss", "aux", "seconds"])
            w.writerows(rows)


def plot_losses(run_dir):
    """Every stage's loss curve (RUN/<stage>_loss.csv) in one picture, RUN/loss.png -> its path (None: no log yet)."""
    from engine.report import loss_plot
    curves = {p.name[:-len("_loss.csv")]: p for p in sorted(Path(run_dir).glob("*_loss.csv"))}
    if not curves:
        return None
    loss_plot(curves, Path(run_dir) / "loss.png")
    return Path(run_dir) / "loss.png"


def _model(preset="ref-XS"):
    return AvatarModel(PRESETS[preset])


def _lr(step, total, base, warmup=200):
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


# ---------------------------------------------------------------------------------------------- AE
def train_ae(corpus, run_dir, steps=3000, batch=16, lr=1e-3, seed=0, preset="ref-XS"):
    """Stage 1: frame autoencoder with the reference-conditioned decoder."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    clips = load_corpus(corpus, keys=("frames", "ref", "face_mask"))
    model = _model(preset)
    ae = model.ae
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    ck = Checkpointer(run_dir, "ae")
    step = ck.resume({"ae": ae}, opt)
    bar = tqdm(total=steps, initial=step, desc="train ae", unit="step")
    rows, t0 = [], time.time()
    while step < steps:
        ci = rng.integers(len(clips), size=batch)
        fi = [rng.integers(len(clips[c]["frames"])) for c in ci]
        x = ae.to_input(np.stack([clips[c]["frames"][f] for c, f in zip(ci, fi)]))
        ref = ae.to_input(np.stack([clips[c]["ref"] for c in ci]))
        face = torch.from_numpy(np.stack([clips[c]["face_mask"][f] for c, f in zip(ci, fi)])).float()[:, None]
        z = ae.encoder(x)
        # robustness to imperfect latents from the DiT: noise relative to the latent scale
        z_in = z + torch.rand(batch, 1, 1, 1) * 0.15 * z.detach().std() * torch.randn_like(z)
        y = ae.decoder(z_in, ae.ref_encoder.features(ref), ref)
        # what differs from the reference (mouth, lids, head sway) is small in area but is all the
        # latent has to carry: weight it up. Squared error, not L1: the decoder starts as an exact copy
        # of the reference (delta = 0) and L1's constant pull on the many static pixels keeps it there.
        moving = F.max_pool2d(((x - ref).abs().amax(1, keepdim=True) > 0.1).float(), 5, 1, 2)
        weight = 1 + 4 * face + 20 * moving
        loss = ((y - x).pow(2) * weight).mean() + 1e-4 * z.pow(2).mean()
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        step += 1
        rows.append([step, round(loss.item(), 5), 0.0, round(time.time() - t0, 1)])
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 200 == 0 or step == steps:
            ck.save({"ae": ae}, opt, step)
            ck.write(rows)
            rows = []
    bar.close()
    return ae


@torch.no_grad()
def encode_corpus(corpus, run_dir, preset="ref-XS", init=None):
    """Stage 2: fit latent statistics, encode every clip (and its reference) once.

    init: shipped weights to take the autoencoder from (latent statistics included) instead of RUN/ae.pt.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = _model(preset)
    if init is not None:
        model.ae.load_state_dict(_init_part(init, "ae"))
    else:
        model.ae.load_state_dict(torch.load(run_dir / "ae.pt", weights_only=False)["ae"])
    ae = model.ae.eval()
    clips = load_corpus(corpus, keys=("frames", "ref"))
    if init is None:
        raw = [ae.encoder(ae.to_input(c["frames"][:: max(1, len(c["frames"]) // 8)])) for c in clips[:200]]
        raw = torch.cat(raw)
        ae.latent_mean.copy_(raw.mean((0, 2, 3)))
        ae.latent_std.copy_(raw.std((0, 2, 3)) + 1e-5)
    out = {}
    for c in tqdm(clips, desc="encode", unit="clip"):
        z = torch.cat([ae.encode(ae.to_input(c["frames"][i:i + 64])) for i in range(0, len(c["frames"]), 64)])
        out[c["name"]] = {"z": z.half(), "ref": ae.encode(ae.to_input(c["ref"])[None])[0].half()}
    torch.save({"ae": ae.state_dict(), "latents": out}, run_dir / "latents.pt")
    return out


# ---------------------------------------------------------------------------------------------- DiT
class ChunkSampler:
    """Random training chunks: target latents, motion latents, audio window, masks, openness, and the
    chunk before it (its latents' motion and audio), from which the model's own motion can be predicted."""

    def __init__(self, clips, latents, cfg, rng):
        self.clips, self.latents, self.cfg, self.rng = clips, latents, cfg, rng
        self.audio = [torch.from_numpy(c["audio"].astype(np.float32)) for c in clips]

    def batch(self, n):
        cfg = self.cfg
        w, m = cfg.frames, cfg.motion_frames
        pre = m + w  # a clip starts in the reference pose, so before frame 0 = reference
        keys = ("x", "mot", "ref", "aud", "open", "face", "person", "x_prev", "mot_prev", "aud_prev", "has_prev")
        out = {k: [] for k in keys}
        for _ in range(n):
            ci = int(self.rng.integers(len(self.clips)))
            c, lat = self.clips[ci], self.latents[self.clips[ci]["name"]]
            z, ref = lat["z"].float(), lat["ref"].float()
            t_len = z.shape[0]
            s = int(self.rng.integers(0, max(1, t_len - w + 1)))  # chunks start anywhere
            if self.rng.random() < 0.1:
                s = 0
            padded = torch.cat([ref[None].repeat(pre, 1, 1, 1), z, z[-1:].repeat(w, 1, 1, 1)])
            out["x"].append(padded[pre + s:pre + s + w])
            out["mot"].append(padded[pre + s - m:pre + s])
            out["x_prev"].append(padded[pre + s - w:pre + s])
            out["mot_prev"].append(padded[pre + s - w - m:pre + s - w])
            out["has_prev"].append(s >= w)
            out["ref"].append(ref)
            out["aud"].append(audio_window(self.audio[ci], s - cfg.lookback, cfg.audio_frames))
            out["aud_prev"].append(audio_window(self.audio[ci], s - w - cfg.lookback, cfg.audio_frames))
            op = np.zeros(cfg.audio_frames, np.float32)
            for j in range(cfg.audio_frames):
                f = s - cfg.lookback + j
                if 0 <= f < len(c["openness"]):
                    op[j] = c["openness"][f]
            out["open"].append(torch.from_numpy(op))
            out["face"].append(torch.from_numpy(c["ref_face_mask"]).float())
            out["person"].append(torch.from_numpy(c["ref_person_mask"]).float())
        has_prev = torch.tensor(out.pop("has_prev"))
        return {k: torch.stack(v) for k, v in out.items()} | {"has_prev": has_prev}


def _init_part(init, part):
    """One part ("ae", "audio", "dit") of a shipped weights file as a state dict (fp32). Parts load alone,
    so a file whose other parts have another shape (an older audio encoder) can still start a stage."""
    from safetensors.torch import load_file
    prefix = part + "."
    return {k[len(prefix):]: v.float() for k, v in load_file(str(init)).items() if k.startswith(prefix)}


def _load_init(model, init):
    """Start the DiT and audio encoder from shipped weights; an audio encoder of another shape starts fresh."""
    model.dit.load_state_dict(_init_part(init, "dit"))
    try:
        model.audio.load_state_dict(_init_part(init, "audio"))
        print(f"DiT and audio encoder start from {init}")
        return True
    except RuntimeError:
        print(f"DiT starts from {init}; its audio encoder has another shape, so the audio encoder starts fresh")
        return False


def warm_up_audio(model, data, steps, batch=64, lr=1e-3):
    """Train a fresh audio encoder on the openness aux loss alone, so the DiT meets meaningful tokens."""
    opt = torch.optim.AdamW(model.audio.parameters(), lr=lr)
    for step in tqdm(range(steps), desc="audio warm-up", unit="step"):
        b = data.batch(batch)
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = F.mse_loss(model.audio.frame_openness(model.audio(b["aud"])), b["open"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"audio warm-up: openness mse {loss.item():.4f}")


@torch.no_grad()
def predicted_motion(model, b, t_range=(0.1, 0.7)):
    """The model's own guess of the motion latents: a one-step x0 prediction of the previous chunk from a
    random noise level. At inference the motion tokens come from generated chunks, whose mouths err
    towards the mean; true motion latents (plus white noise) never show the model such errors."""
    n = b["x"].shape[0]
    m = model.cfg.motion_frames
    x_prev = b["x_prev"]
    t = torch.empty(n).uniform_(*t_range)
    noise = torch.randn_like(x_prev)
    tt = t[:, None, None, None, None]
    xt = (1 - tt) * x_prev + tt * noise
    cond = model.dit.prepare(b["ref"], b["mot_prev"], model.audio(b["aud_prev"]), b["face"], b["person"])
    v = model.dit(xt, t, cond).float()
    return (xt - tt * v)[:, -m:]


def train_dit(corpus, run_dir, steps=6000, batch=32, lr=3e-4, seed=0, preset="ref-XS", bf16=True, init=None,
              audio_drop=0.1, motion_noise=0.25, self_motion=0.5, audio_warmup=3000):
    """Stage 3: audio encoder + DiT, rectified flow matching with a face- and motion-weighted loss and an
    openness aux loss.

    audio_drop: fraction of samples trained with null audio tokens (all zeros), so the sampler can use
    classifier-free guidance on the audio. motion_noise: the largest noise added to the motion latents
    (relative to their unit scale): at inference they come from generated chunks, and a model that can
    copy clean motion frames learns to extrapolate the mouth instead of listening. self_motion: fraction of
    samples (past the first chunk) whose motion latents are the model's own prediction (predicted_motion).

    init: shipped weights to start the DiT and audio encoder from when RUN/dit.pt does not exist yet
    (checkpoints stay out of git, so a later session continues from the shipped model). A fresh audio
    encoder (none in init, or one of another shape) first trains alone for audio_warmup steps.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    run_dir = Path(run_dir)
    model = _model(preset)
    lat = torch.load(run_dir / "latents.pt", weights_only=False)
    model.ae.load_state_dict(lat["ae"])
    clips = load_corpus(corpus, keys=("audio", "openness", "ref_face_mask", "ref_person_mask"))
    data = ChunkSampler(clips, lat["latents"], model.cfg, rng)
    params = list(model.dit.parameters()) + list(model.audio.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ck = Checkpointer(run_dir, "dit")
    if not ck.path.exists():
        audio_ready = init is not None and _load_init(model, init)
        if not audio_ready and audio_warmup > 0:
            warm_up_audio(model, data, audio_warmup)
        ck.save({"dit": model.dit, "audio": model.audio}, opt, 0)
    step = ck.resume({"dit": model.dit, "audio": model.audio}, opt)
    bar = tqdm(total=steps, initial=step, desc="train dit", unit="step")
    rows, t0 = [], time.time()
    dit = model.dit
    while step < steps:
        b = data.batch(batch)
        x0, mot, ref, aud, opn, face, person = (b[k] for k in ("x", "mot", "ref", "aud", "open", "face", "person"))
        if self_motion > 0:
            own = b["has_prev"] & (torch.rand(batch) < self_motion)
            if own.any():
                sub = {k: v[own] for k, v in b.items()}
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    mot = mot.clone()
                    mot[own] = predicted_motion(model, sub).to(mot.dtype)
        # the motion latents at inference come from generated chunks: make the model tolerate small errors
        mot = mot + torch.rand(batch, 1, 1, 1, 1) * motion_noise * torch.randn_like(mot)
        t = torch.sigmoid(torch.randn(batch))  # logit-normal times
        noise = torch.randn_like(x0)
        xt = (1 - t)[:, None, None, None, None] * x0 + t[:, None, None, None, None] * noise
        tokens = model.audio(aud)
        keep = (torch.rand(batch, 1, 1) >= audio_drop).float()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            cond = dit.prepare(ref, mot, tokens * keep, face, person)
            v = dit(xt, t, cond)
            aux_pred = model.audio.frame_openness(tokens)
        v = v.float()
        err = (v - (noise - x0)).pow(2).mean(2)  # [B, W, H, W]
        fm = F.interpolate(face[:, None], size=err.shape[-2:], mode="area")  # [B,1,H,W]
        # what moves away from the reference (mouth, lids, sway) is small in area: weight it up
        moving = (x0 - ref[:, None]).abs().mean(2)  # [B, W, H, W]
        moving = moving / moving.amax((1, 2, 3), keepdim=True).clamp_min(1e-6)
        loss = (err * (1 + 4 * (fm * 4).clamp(0, 1) + 8 * moving)).mean()
        aux = F.mse_loss(aux_pred.float(), opn)  # on the encoder's own tokens, never dropped
        total = loss + 0.5 * aux
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        rows.append([step, round(loss.item(), 5), round(aux.item(), 5), round(time.time() - t0, 1)])
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", aux=f"{aux.item():.4f}")
        if step % 200 == 0 or step == steps:
            ck.save({"dit": model.dit, "audio": model.audio}, opt, step)
            ck.write(rows)
            rows = []
    bar.close()
    return model


# ------------------------------------------------------------------------------------------ decoder
class DecoderSampler:
    """Random training chunks for the decoder: true frames, their latents (encoded once per clip with the
    frozen encoder), and what the DiT needs to predict those latents (motion, audio window, masks)."""

    def __init__(self, clips, model, rng, blink_share=0.0):
        self.clips, self.model, self.rng, self.blink_share = clips, model, rng, blink_share
        self.audio = [torch.from_numpy(c["audio"].astype(np.float32)) for c in clips]
        # frames with the eyes mostly shut: ~3% of frames, so the decoder rarely sees closed lids unless asked
        self.blinks = [np.flatnonzero(c["blink"] > 0.5) if "blink" in c else np.zeros(0, int) for c in clips]
        self._z = {}

    @torch.no_grad()
    def latents(self, ci):
        """Standardised latents of clip ci [T, C, h, w] and of its reference [C, h, w] (cached)."""
        if ci not in self._z:
            ae, c = self.model.ae, self.clips[ci]
            z = torch.cat([ae.encode(ae.to_input(c["frames"][i:i + 64])) for i in range(0, len(c["frames"]), 64)])
            self._z[ci] = (z.half(), ae.encode(ae.to_input(c["ref"])[None])[0].half())
        z, ref = self._z[ci]
        return z.float(), ref.float()

    def batch(self, n):
        cfg = self.model.cfg
        w, m = cfg.frames, cfg.motion_frames
        keys = ("frames", "ref_img", "face_px", "x", "mot", "ref", "aud", "face", "person")
        out = {k: [] for k in keys}
        with_blinks = [i for i, b in enumerate(self.blinks) if len(b)]
        for _ in range(n):
            blink = with_blinks and self.rng.random() < self.blink_share
            ci = int(self.rng.choice(with_blinks) if blink else self.rng.integers(len(self.clips)))
            c = self.clips[ci]
            z, ref = self.latents(ci)
            t_len = z.shape[0]
            s = int(self.rng.integers(0, max(1, t_len - w + 1)))
            if blink:  # a chunk that holds a closed-eye frame
                f = int(self.rng.choice(self.blinks[ci]))
                s = int(np.clip(f - self.rng.integers(w), 0, max(0, t_len - w)))
            padded = torch.cat([ref[None].repeat(m, 1, 1, 1), z, z[-1:].repeat(w, 1, 1, 1)])
            idx = np.minimum(np.arange(s, s + w), t_len - 1)
            out["frames"].append(torch.from_numpy(c["frames"][idx]))
            out["face_px"].append(torch.from_numpy(c["face_mask"][idx]))
            out["ref_img"].append(torch.from_numpy(c["ref"]))
            out["x"].append(padded[m + s:m + s + w])
            out["mot"].append(padded[s:s + m])
            out["ref"].append(ref)
            out["aud"].append(audio_window(self.audio[ci], s - cfg.lookback, cfg.audio_frames))
            out["face"].append(torch.from_numpy(c["ref_face_mask"]).float())
            out["person"].append(torch.from_numpy(c["ref_person_mask"]).float())
        return {k: torch.stack(v) for k, v in out.items()}


class PortraitSampler:
    """Chunks of faces the corpus never shows, drawn straight by the renderer (no speech): identities from
    `first` up (the held-out ones are 1000-1002), each chunk a random head offset that drifts, a blink
    phase and mouth shapes. The decoder and its reference encoder meet many more faces than the DiT's 24."""

    def __init__(self, rng, frames, first=2000, count=5000):
        self.rng, self.frames, self.first, self.count = rng, frames, first, count

    def batch(self, n):
        r = self.rng
        out = {"frames": [], "face_px": [], "ref_img": []}
        for _ in range(n):
            idn = portraits.identity(self.first + int(r.integers(self.count)))
            start, drift = r.uniform(-4, 4, 2), r.normal(0, 0.4, 2)
            blink = np.clip(r.uniform(-1.5, 1.5) + np.arange(self.frames) * r.choice([-0.3, 0.3]), 0, 1)
            frames, faces = [], []
            for i in range(self.frames):
                dx, dy = np.clip(start + i * drift, -4, 4)
                img, _, face = portraits.draw(idn, r.uniform(0, 1) ** 1.5, r.uniform(0, 1), blink[i], dx, dy)
                frames.append(img)
                faces.append(face)
            out["frames"].append(torch.from_numpy(np.stack(frames)))
            out["face_px"].append(torch.from_numpy(np.stack(faces)))
            out["ref_img"].append(torch.from_numpy(portraits.draw(idn)[0]))
        return {k: torch.stack(v) for k, v in out.items()}


@torch.no_grad()
def dit_latents(model, b, t_max=0.3, guidance=DEFAULT_GUIDANCE):
    """The DiT's guided one-step x0 prediction of each chunk from a random noise level t <= t_max: latents
    with the structured errors of generated ones (off the encoder's manifold), unlike white noise."""
    x0 = b["x"]
    n = x0.shape[0]
    t = torch.rand(n) * t_max
    tt = t[:, None, None, None, None]
    xt = (1 - tt) * x0 + tt * torch.randn_like(x0)
    cond = model.dit.prepare(b["ref"], b["mot"], model.audio(b["aud"]), b["face"], b["person"], null_audio=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v_audio, v_null = model.dit(torch.cat([xt, xt]), torch.cat([t, t]), cond).float().chunk(2)
    return xt - tt * (v_null + guidance * (v_audio - v_null))


def train_decoder(corpus, run_dir, init, steps=1000, batch=4, lr=3e-4, seed=0, generated=0.5, t_max=0.3, max_clips=None,
                  fine=0, blink_share=0.0, fine_window=None, portrait_share=0.0, widths=None,
                  fine_blocks=0, image_warp=None):
    """Stage `decoder`: retrain the reference-conditioned decoder (flow warp + delta) and the reference
    encoder with the frame encoder frozen, so the latent space, and with it the DiT, its SyncCache
    calibration and schedules, stays as shipped in `init`.

    Each step decodes `batch` chunks (4 frames each). A fraction `generated` of them are decoded from the
    DiT's own latent prediction (dit_latents, from noise levels up to t_max) instead of the encoder's, the
    rest from encoder latents with a little noise: the decoder learns to draw the true frame from the
    latents it will meet at inference. init may be a file this stage wrote (a second, gentler pass).
    fine: width of the 128-px refinement stage to add (AEConfig.fine; kept if init has one); blink_share:
    the fraction of chunks drawn so that they hold a closed-eye frame; fine_window: the rows and columns
    that stage covers (AEConfig.fine_window); portrait_share: the fraction of chunks that are faces the corpus
    never shows (PortraitSampler), decoded from their encoder latents. widths: a decoder of other widths
    (AEConfig.decoder_widths, e.g. a cheaper one for slow CPUs) that starts from scratch beside init's reference
    encoder. fine_blocks: deepen the 128-px stage to this many residual blocks after its first (AEConfig.fine_blocks;
    the added ones start as the identity, so the decoder starts where init's was). image_warp: how the flow
    resamples the reference image (AEConfig.image_warp; None: init's).
    """
    from engine.model.autoencoder import AEConfig
    from engine.model.avatar import load_model
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 2)
    shipped = load_model(init)
    widths = tuple(widths) if widths else shipped.ae.cfg.decoder_widths
    ae_cfg = AEConfig(**{**shipped.ae.cfg.__dict__, "flow": True, "fine": shipped.ae.cfg.fine or fine,
                         "fine_window": fine_window or shipped.ae.cfg.fine_window, "decoder_widths": widths,
                         "fine_blocks": max(fine_blocks, shipped.ae.cfg.fine_blocks),
                         "image_warp": image_warp or shipped.ae.cfg.image_warp})
    model = AvatarModel(shipped.cfg, ae_cfg)
    state, new = shipped.state_dict(), ("ae.decoder.flow.", "ae.decoder.fine")
    if widths != shipped.ae.cfg.decoder_widths:  # a decoder of other widths starts from scratch
        state, new = {k: v for k, v in state.items() if not k.startswith("ae.decoder.")}, ("ae.decoder.",)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(new) for k in missing):
        raise RuntimeError(f"init {init} does not fit: missing {missing}, unexpected {unexpected}")
    del shipped
    model.eval()
    for p_ in model.parameters():
        p_.requires_grad_(False)
    ae = model.ae
    params = list(ae.decoder.parameters()) + list(ae.ref_encoder.parameters())
    for p_ in params:
        p_.requires_grad_(True)
    clips = load_corpus(corpus, keys=("frames", "audio", "ref", "face_mask", "ref_face_mask", "ref_person_mask",
                                      "blink"))
    clips = clips[:max_clips] if max_clips else clips
    data = DecoderSampler(clips, model, rng, blink_share)
    faces = PortraitSampler(rng, model.cfg.frames)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ck = Checkpointer(run_dir, "decoder")
    step = ck.resume({"ae": ae}, opt)
    bar = tqdm(total=steps, initial=step, desc="train decoder", unit="step")
    rows, t0 = [], time.time()
    while step < steps:
        n_new = min(batch - 1, int((rng.random(batch) < portrait_share).sum()))  # faces the corpus never shows
        b = data.batch(batch - n_new)
        z = b["x"].clone()
        gen = torch.rand(batch - n_new) < generated
        if gen.any():
            z[gen] = dit_latents(model, {k: v[gen] for k, v in b.items()}, t_max=t_max)
        if n_new:
            new = faces.batch(n_new)
            with torch.no_grad():
                z_new = ae.encode(ae.to_input(new["frames"]).flatten(0, 1)).unflatten(0, (n_new, -1))
            z, gen = torch.cat([z, z_new]), torch.cat([gen, torch.zeros(n_new, dtype=torch.bool)])
            b = {k: torch.cat([b[k], new[k]]) for k in new}
        z = z + (~gen).float()[:, None, None, None, None] * torch.rand(batch, 1, 1, 1, 1) * 0.1 * torch.randn_like(z)
        x = ae.to_input(b["frames"]).flatten(0, 1)  # [B*W, 3, 128, 128]
        ref = ae.to_input(b["ref_img"])  # [B, 3, 128, 128]
        w = z.shape[1]
        ref_feats = [f.repeat_interleave(w, 0) for f in ae.ref_encoder.features(ref)]
        raw = z.flatten(0, 1) * ae.latent_std[:, None, None] + ae.latent_mean[:, None, None]
        y = ae.decoder(raw, ref_feats, ref.repeat_interleave(w, 0))
        face = b["face_px"].flatten(0, 1).float()[:, None]
        refx = ref.repeat_interleave(w, 0)
        moving = F.max_pool2d(((x - refx).abs().amax(1, keepdim=True) > 0.1).float(), 5, 1, 2)
        weight = 1 + 8 * face + 20 * moving
        loss = ((y - x).pow(2) * weight).mean() + 0.1 * ((y - x).abs() * weight).mean()
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup=50)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        rows.append([step, round(loss.item(), 5), float(gen.float().mean()), round(time.time() - t0, 1)])
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 100 == 0 or step == steps:
            ck.save({"ae": ae}, opt, step)
            ck.write(rows)
            rows = []
    bar.close()
    out = Path(run_dir) / "avatar.safetensors"
    meta = {"decoder_steps": step, "decoder_init": str(init)}
    save_model(model, out, extra_meta=meta)
    save_decoder(model.ae, Path(run_dir) / "decoder.safetensors", extra_meta=meta)  # what ships as a second decoder
    print(json.dumps({"out": str(out), "decoder": str(Path(run_dir) / "decoder.safetensors"), "decoder_steps": step}))
    return model


def export(run_dir, out_path, preset="ref-XS"):
    """Stage 4: gather AE + DiT + audio encoder into one safetensors file."""
    run_dir = Path(run_dir)
    model = _model(preset)
    model.ae.load_state_dict(torch.load(run_dir / "latents.pt", weights_only=False)["ae"])
    state = torch.load(run_dir / "dit.pt", weights_only=False)
    model.dit.load_state_dict(state["dit"])
    model.audio.load_state_dict(state["audio"])
    save_model(model, out_path, extra_meta={"dit_steps": state["step"], "preset": preset})
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"out": str(out_path), "params": n, "dit_steps": state["step"]}))
