"""The reference talking-portrait model: frame autoencoder + audio encoder + AvatarDiT, saved as safetensors."""
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from engine.model.audio_encoder import AudioEncoder
from engine.model.autoencoder import AEConfig, FrameAutoencoder
from engine.model.dit import AvatarDiT, DiTConfig

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "avatar.safetensors"


class AvatarModel(nn.Module):
    """Container for the three trained parts."""

    def __init__(self, dit_cfg: DiTConfig = DiTConfig(), ae_cfg: AEConfig = AEConfig()):
        super().__init__()
        self.ae = FrameAutoencoder(ae_cfg)
        self.audio = AudioEncoder(dim=dit_cfg.audio_dim)
        self.dit = AvatarDiT(dit_cfg)

    @property
    def cfg(self) -> DiTConfig:
        return self.dit.cfg

    def metadata(self):
        return {"dit": json.dumps(asdict(self.dit.cfg)), "ae": json.dumps(asdict(self.ae.cfg))}


def _tuples(d):
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def save_model(model: AvatarModel, path, half=True, extra_meta=None):
    """Write weights (fp16 storage by default, to keep shipped files small) with configs as metadata."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if half:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    meta = model.metadata()
    meta.update({k: str(v) for k, v in (extra_meta or {}).items()})
    save_file(sd, str(path), metadata=meta)


DECODER_KEYS = ("ref_encoder.", "decoder.", "latent_mean", "latent_std")  # a decoder file: the AE's decoding side


def save_decoder(ae: FrameAutoencoder, path, extra_meta=None):
    """Write only the decoding side of an autoencoder (reference encoder, decoder, latent statistics), fp16, with its
    AEConfig: a second decoder for the same latents (e.g. a cheaper one, AEConfig.decoder_widths)."""
    sd = {k: v.detach().half().contiguous() if v.is_floating_point() else v.detach().contiguous()
          for k, v in ae.state_dict().items() if k.startswith(DECODER_KEYS)}
    meta = {"ae": json.dumps(asdict(ae.cfg))}
    meta.update({k: str(v) for k, v in (extra_meta or {}).items()})
    save_file(sd, str(path), metadata=meta)


def load_decoder(path, model: AvatarModel) -> FrameAutoencoder:
    """A decoder file (save_decoder) for model's latents, as a FrameAutoencoder that shares model's encoder:
    its `reference` and `decode` draw frames from the same latents as model.ae."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"decoder weights not found: {path}")
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "ae" not in meta:
        raise ValueError(f"{path} is not a decoder file (no AEConfig in its metadata)")
    cfg = AEConfig(**_tuples(json.loads(meta["ae"])))
    own = model.ae.cfg
    if (cfg.image_size, cfg.latent_channels, cfg.widths) != (own.image_size, own.latent_channels, own.widths):
        raise ValueError(f"{path} decodes other latents: image {cfg.image_size}, {cfg.latent_channels} channels, "
                         f"widths {cfg.widths}; the model's are {own.image_size}, {own.latent_channels}, {own.widths}")
    ae = FrameAutoencoder(cfg)
    ae.encoder = model.ae.encoder
    sd = {k: v.float() for k, v in load_file(str(path)).items()}
    missing, unexpected = ae.load_state_dict(sd, strict=False)
    if unexpected or any(not k.startswith("encoder.") for k in missing):
        raise ValueError(f"{path} does not fit its AEConfig: missing {missing}, unexpected {unexpected}")
    if not (torch.allclose(ae.latent_mean, model.ae.latent_mean, atol=1e-2) and
            torch.allclose(ae.latent_std, model.ae.latent_std, atol=1e-2)):
        raise ValueError(f"{path} was trained on other latents (its latent statistics differ from the model's)")
    return ae.eval()


def load_model(path=DEFAULT_WEIGHTS) -> AvatarModel:
    """Load an AvatarModel from safetensors (configs come from the file's metadata)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model weights not found: {path}")
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    dit_cfg = DiTConfig(**_tuples(json.loads(meta["dit"]))) if "dit" in meta else DiTConfig()
    ae_cfg = AEConfig(**_tuples(json.loads(meta["ae"]))) if "ae" in meta else AEConfig()
    model = AvatarModel(dit_cfg, ae_cfg)
    sd = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(sd)
    return model.eval()
