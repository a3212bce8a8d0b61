"""Random inputs for an AvatarDiT, shared by the model and SyncCache tests."""
import torch


def random_condition(dit, b=1):
    """A ChunkCondition with random reference, motion and audio tokens and a box face mask."""
    cfg = dit.cfg
    ref = torch.randn(b, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    mot = torch.randn(b, cfg.motion_frames, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    audio = torch.randn(b, cfg.audio_frames * 2, cfg.audio_dim)
    mask = torch.zeros(b, 128, 128)
    mask[:, 60:100, 40:90] = 1
    return dit.prepare(ref, mot, audio, mask, mask)
