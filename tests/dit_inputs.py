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


def random_setup(cfg, seed=0, std=0.05):
    """(dit, cond, noise): an AvatarDiT with random non-zero weights (adaLN-Zero init would make every
    block the identity), a random chunk condition and start noise."""
    from engine.model.dit import AvatarDiT
    torch.manual_seed(seed)
    dit = AvatarDiT(cfg).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, std)
    cond = random_condition(dit)
    noise = torch.randn(1, cfg.frames, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    return dit, cond, noise
