# Test fixture written for qwen-ckpt-compat: the audio side of Qwen-Audio(-Chat), re-implemented small from the
# documented interface of its remote `audio.py` (not copied from it). Kept as the real file has it
# (docs/facts/qwen-audio.md, "The audio encoder"):
# * `AudioEncoder(n_mels, n_ctx, n_state, n_head, n_layer, output_dim, avg_pool, add_audio_bos_eos_token, ...)`,
#   built from `config.audio`: two 1-D convolutions (the second with stride 2), a fixed sinusoidal position table
#   (a buffer), `blocks` of `ResidualAttentionBlock` (pre-norm self-attention `query`/`key`/`value`/`out` and an MLP
#   `Sequential(Linear, GELU, Linear)`), an average pool of 2, `ln_post`, `proj`, and a 2-row embedding of the
#   span's first and last vectors (`audio_bos_eos_token`);
# * its forward loops over the blocks and never checkpoints them;
# * `encode(input_audios, input_audio_lengths, audio_span_tokens)`: one `audio_span_tokens[i]`-long sequence per
#   audio (first vector, the pooled frames, last vector), the frames past each audio's length masked out;
# * the helpers the tokenizer imports: `load_audio` and `log_mel_spectrogram`.
# The real file decodes any format with the `ffmpeg` command and uses Whisper's 80-band filters (16 kHz, 30 s);
# this one reads 16-bit mono WAV files with the standard library and computes a tiny filter bank in code
# (`SAMPLE_RATE`, `HOP_LENGTH`, `N_FFT`, `N_MELS` below), so that a test needs neither ffmpeg nor a download.

import math
import wave
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 1600
N_FFT = 32
HOP_LENGTH = 16
N_MELS = 8
CHUNK_SAMPLES = 512  # the real one: 30 s at 16 kHz; here 32 frames, 16 positions after the convolutions


def load_audio(path: str) -> torch.Tensor:
    """The samples of a 16-bit mono WAV file, as floats in [-1, 1)."""
    with wave.open(path, "rb") as f:
        if f.getsampwidth() != 2 or f.getnchannels() != 1:
            raise ValueError(f"{path}: the tiny fixture reads 16-bit mono WAV only")
        frames = f.readframes(f.getnframes())
    return torch.frombuffer(bytearray(frames), dtype=torch.int16).float() / 32768.0


def pad_or_trim(samples: torch.Tensor, length: int = CHUNK_SAMPLES) -> torch.Tensor:
    if samples.shape[-1] > length:
        return samples[..., :length]
    return F.pad(samples, (0, length - samples.shape[-1]))


def _mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT) -> torch.Tensor:
    """Triangular filters over the STFT bins, evenly spaced (a tiny stand-in for Whisper's mel filter bank)."""
    bins = n_fft // 2 + 1
    edges = torch.linspace(0, bins - 1, n_mels + 2)
    grid = torch.arange(bins, dtype=torch.float32)
    rising = (grid[None, :] - edges[:-2, None]) / (edges[1:-1, None] - edges[:-2, None])
    falling = (edges[2:, None] - grid[None, :]) / (edges[2:, None] - edges[1:-1, None])
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


def log_mel_spectrogram(samples: torch.Tensor) -> torch.Tensor:
    """`[N_MELS, frames]`, log-scaled and clipped to 8 decades below the peak, as Whisper's front end does."""
    window = torch.hann_window(N_FFT)
    stft = torch.stft(samples, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = _mel_filters() @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def length_after_convolutions(frames: int) -> int:
    """Positions left by the two convolutions (the second has stride 2)."""
    return (frames - 1) // 2 + 1


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inverse = torch.exp(-increment * torch.arange(channels // 2, dtype=torch.float32))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inverse[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, length, width = x.shape
        heads = [t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in (self.query(x), self.key(x), self.value(x))]
        context = F.scaled_dot_product_attention(*heads, attn_mask=mask)
        return self.out(context.transpose(1, 2).reshape(batch, length, width))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, n_state * 4), nn.GELU(), nn.Linear(n_state * 4, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), mask=mask)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    def __init__(
        self, n_mels, n_ctx, n_state, n_head, n_layer, output_dim=512, avg_pool=True, add_audio_bos_eos_token=True,
        **kwargs,
    ):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer)])
        self.ln_post = nn.LayerNorm(n_state)
        self.avg_pooler = nn.AvgPool1d(2, stride=2) if avg_pool else None
        self.proj = nn.Linear(n_state, output_dim)
        self.audio_bos_eos_token = nn.Embedding(2, output_dim) if add_audio_bos_eos_token else None
        self.output_dim = output_dim
        self.n_head = n_head

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """`x`: `[batch, n_mels, frames]`; `padding_mask`: `[batch, positions]`, 1 past each audio's length."""
        x = x.to(dtype=self.conv1.weight.dtype, device=self.conv1.weight.device)
        x = F.gelu(self.conv2(F.gelu(self.conv1(x)))).permute(0, 2, 1)
        x = x + self.positional_embedding[: x.size(1)].to(x.dtype)
        mask = None
        if padding_mask is not None:
            x = x[:, : padding_mask.size(1)]  # the longest audio of the batch
            padded = padding_mask.bool()
            x = x.masked_fill(padded[..., None], 0.0)
            mask = torch.zeros(padded.shape, dtype=x.dtype, device=x.device).masked_fill(padded, float("-inf"))
            mask = mask[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask=mask)
        if self.avg_pooler is not None:
            x = self.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)
        x = self.proj(self.ln_post(x))
        if self.audio_bos_eos_token is None:
            return x, None, None
        return x, self.audio_bos_eos_token.weight[0][None, :], self.audio_bos_eos_token.weight[1][None, :]

    def encode(self, input_audios: torch.Tensor, input_audio_lengths: torch.Tensor, audio_span_tokens: List[int]):
        lengths = input_audio_lengths[:, 0].tolist()
        padding_mask = torch.ones(input_audios.size(0), max(lengths), device=self.conv1.weight.device)
        for index, length in enumerate(lengths):
            padding_mask[index, :length] = 0
        x, bos, eos = self(input_audios, padding_mask)
        outputs = []
        for index, span in enumerate(audio_span_tokens):
            audio = x[index][: span - 2]
            if bos is not None:
                audio = torch.cat([bos, audio, eos])
            if len(audio) != span:
                raise ValueError(f"audio {index}: {len(audio)} vectors for a span of {span}")
            outputs.append(audio)
        return outputs
