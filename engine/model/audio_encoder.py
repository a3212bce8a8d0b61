"""Audio features for the DiT: log-mel (torch) -> small conv encoder -> 2 audio tokens per video frame."""
import torch
import torch.nn as nn

from engine.audio import SAMPLES_PER_FRAME, LogMel

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
    """Audio window [B, S] -> tokens [B, frames * 2, dim] (+ an auxiliary per-frame openness head).

    The log-mel enters twice: with a fixed scale (keeps loudness: silence stays silence) and normalised
    over the window itself (each mel bin minus its mean over the window, over the window's spread), which
    cancels microphone gain and EQ without seeing the rest of the utterance, so it streams. Dilated convs
    widen each token's view to about +-9 mel frames (+-90 ms) at 20 ms resolution.
    """

    def __init__(self, dim=128, mel_bins=80, max_tokens=64):
        super().__init__()
        self.mel = LogMel()
        self.conv = nn.Sequential(
            nn.Conv1d(2 * mel_bins, dim, 5, padding=2), nn.SiLU(),
            nn.Conv1d(dim, dim, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv1d(dim, dim, 3, padding=1), nn.SiLU(),
            nn.Conv1d(dim, dim, 3, padding=2, dilation=2), nn.SiLU(),
            nn.Conv1d(dim, dim, 3, padding=4, dilation=4), nn.SiLU(),
            nn.Conv1d(dim, dim, 3, padding=1),
        )
        self.norm = nn.LayerNorm(dim)
        self.pos = nn.Parameter(torch.zeros(1, max_tokens, dim))
        self.openness = nn.Linear(dim, 1)  # auxiliary: supervised with the corpus mouth track

    def features(self, samples):
        """samples [B, S] -> [B, 160, 4 * frames]: fixed-scale and window-normalised log-mel."""
        m = self.mel(samples)[..., :-1]  # [B, 80, 4 * frames]
        fixed = (m + 5.0) / 4.0
        window = (m - m.mean(-1, keepdim=True)) / m.std((1, 2), keepdim=True).clamp_min(0.5)
        return torch.cat([fixed, window], 1)

    def forward(self, samples, margin=MARGIN_FRAMES):
        """samples [B, S] covering frames incl. margins -> tokens [B, N, dim] without the margins."""
        return self.tokens(self.features(samples), margin)

    def tokens(self, feats, margin=MARGIN_FRAMES):
        """features [B, 160, 4 * frames] -> tokens [B, N, dim] without the margins (the part an audio-path
        backend may run: engine/audio_path.py; the log-mel stays in torch)."""
        h = self.conv(feats).transpose(1, 2)  # [B, 2 * frames, dim]
        cut = margin * TOKENS_PER_FRAME
        h = h[:, cut:h.shape[1] - cut]
        return self.norm(h + self.pos[:, :h.shape[1]])

    def frame_openness(self, tokens):
        """tokens [B, N, dim] -> openness per video frame [B, N / 2]."""
        b, n, d = tokens.shape
        return self.openness(tokens.reshape(b, n // TOKENS_PER_FRAME, TOKENS_PER_FRAME, d).mean(2)).squeeze(-1)
