"""Audio features for the DiT: log-mel (torch) -> small conv encoder -> 2 audio tokens per video frame."""
import torch
import torch.nn as nn

from engine.audio import LogMel

SAMPLE_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
TOKENS_PER_FRAME = 2  # one audio token per 20 ms
MARGIN_FRAMES = 1  # extra audio decoded on each side so convolutions see real context at the edges


def audio_window(audio, start_frame, num_frames, margin=MARGIN_FRAMES):
    """Samples for video frames [start_frame - margin, start_frame + num_frames + margin), zero-padded.

    audio: float tensor [S] (16 kHz mono) -> [(num_frames + 2 * margin) * 640]
    """
    a = (start_frame - margin) * SAMPLES_PER_FRAME
    b = (start_frame + num_frames + margin) * SAMPLES_PER_FRAME
    lo, hi = max(a, 0), min(b, audio.shape[-1])
    out = audio.new_zeros(b - a)
    if hi > lo:
        out[lo - a:hi - a] = audio[lo:hi]
    return out


class AudioEncoder(nn.Module):
    """Audio window [B, S] -> tokens [B, frames * 2, dim] (+ an auxiliary per-frame openness head)."""

    def __init__(self, dim=128, mel_bins=80, max_tokens=64):
        super().__init__()
        self.mel = LogMel()
        self.conv = nn.Sequential(
            nn.Conv1d(mel_bins, dim, 5, padding=2), nn.SiLU(),
            nn.Conv1d(dim, dim, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv1d(dim, dim, 3, padding=1), nn.SiLU(),
            nn.Conv1d(dim, dim, 3, padding=1),
        )
        self.norm = nn.LayerNorm(dim)
        self.pos = nn.Parameter(torch.zeros(1, max_tokens, dim))
        self.openness = nn.Linear(dim, 1)  # auxiliary: supervised with the corpus mouth track

    def forward(self, samples, margin=MARGIN_FRAMES):
        """samples [B, S] covering frames incl. margins -> tokens [B, N, dim] without the margins."""
        m = self.mel(samples)[..., :-1]  # [B, 80, 4 * frames]
        m = (m + 5.0) / 4.0  # fixed normalisation: streaming cannot see the whole utterance
        h = self.conv(m).transpose(1, 2)  # [B, 2 * frames, dim]
        cut = margin * TOKENS_PER_FRAME
        h = h[:, cut:h.shape[1] - cut]
        return self.norm(h + self.pos[:, :h.shape[1]])

    def frame_openness(self, tokens):
        """tokens [B, N, dim] -> openness per video frame [B, N / 2]."""
        b, n, d = tokens.shape
        return self.openness(tokens.reshape(b, n // TOKENS_PER_FRAME, TOKENS_PER_FRAME, d).mean(2)).squeeze(-1)
