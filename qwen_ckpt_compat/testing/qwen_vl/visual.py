# Test fixture written for qwen-ckpt-compat: an independent, tiny re-implementation of the interface of
# Qwen-VL's `visual.py`: a vision transformer (patch convolution, `transformer.resblocks` of
# `VisualAttentionBlock` on sequence-first tokens, a one-layer cross-attention `Resampler` with learned
# queries) and `encode(image_paths)`, which opens each image from a path or URL. Like the real file it
# imports `requests` and `PIL` when it is imported (transformers demands them when the model loads).
# Deviation: the real one also imports torchvision, for the resize/normalise transform; here that transform
# is written with PIL and torch, so that the fixture runs beside CPU builds of torch that have no matching
# torchvision. It is not a copy of the real code.

import math
from collections import OrderedDict
from functools import partial
from io import BytesIO

import requests
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


def get_abs_pos(abs_pos, tgt_size):
    """`abs_pos`: `[L, C]` for a square grid; resized (bicubic) to `tgt_size` positions when they differ."""
    src = int(math.sqrt(abs_pos.size(0)))
    tgt = int(math.sqrt(tgt_size))
    if src == tgt:
        return abs_pos
    grid = abs_pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(dtype=abs_pos.dtype)


def sincos_2d(embed_dim, grid_size):
    """Fixed 2-D sine/cosine position table, `[grid_size ** 2, embed_dim]`."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_h, grid_w = torch.meshgrid(coords, coords, indexing="ij")

    def one_axis(dim, positions):
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        angles = positions.reshape(-1)[:, None] * omega[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([one_axis(embed_dim // 2, grid_w), one_axis(embed_dim // 2, grid_h)], dim=1).float()


class Resampler(nn.Module):
    """One cross-attention from `grid_size ** 2` learned queries to the patch features."""

    def __init__(self, grid_size, embed_dim, num_heads, kv_dim=None, norm_layer=nn.LayerNorm):
        super().__init__()
        self.num_queries = grid_size**2
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, grid_size)).requires_grad_(False)
        self.query = nn.Parameter(torch.zeros(self.num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim is not None and kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = norm_layer(embed_dim)
        self.ln_kv = norm_layer(embed_dim)

    def forward(self, x, attn_mask=None):
        pos_embed = get_abs_pos(self.pos_embed, x.size(1))
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # [patches, batch, dim]
        batch = x.shape[1]
        query = self.ln_q(self.query)
        out = self.attn(
            query.unsqueeze(1).repeat(1, batch, 1) + self.pos_embed.unsqueeze(1),
            x + pos_embed.unsqueeze(1),
            x,
            attn_mask=attn_mask,
        )[0]
        return out.permute(1, 0, 2)


class VisualAttention(nn.Module):
    """Self-attention on sequence-first `[seq, batch, width]` tokens."""

    def __init__(self, embed_dim, num_heads):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, query, key, value, attn_mask=None):
        seq, batch, _ = query.shape
        mixed = self.in_proj(query).view(seq, batch, self.num_heads, 3 * self.head_dim)
        q, k, v = mixed.split(self.head_dim, dim=-1)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [batch, heads, seq, head_dim]
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        context = context.permute(2, 0, 1, 3).reshape(seq, batch, self.embed_dim)
        return self.out_proj(context)


class VisualAttentionBlock(nn.Module):
    def __init__(self, d_model, n_head, mlp_ratio=4.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.ln_1 = norm_layer(d_model)
        self.ln_2 = norm_layer(d_model)
        width = int(d_model * mlp_ratio)
        self.attn = VisualAttention(d_model, n_head)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(d_model, width)), ("gelu", act_layer()), ("c_proj", nn.Linear(width, d_model))])
        )

    def attention(self, q_x, k_x=None, v_x=None, attn_mask=None):
        k_x = k_x if k_x is not None else q_x
        v_x = v_x if v_x is not None else q_x
        attn_mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
        return self.attn(q_x, k_x, v_x, attn_mask=attn_mask)

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        x = q_x + self.attention(q_x=self.ln_1(q_x), k_x=k_x, v_x=v_x, attn_mask=attn_mask)
        return x + self.mlp(self.ln_2(x))


class TransformerBlock(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio=4.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(
            [VisualAttentionBlock(width, heads, mlp_ratio, act_layer=act_layer, norm_layer=norm_layer) for _ in range(layers)]
        )

    def get_cast_dtype(self):
        return self.resblocks[0].mlp.c_fc.weight.dtype

    def get_cast_device(self):
        return self.resblocks[0].mlp.c_fc.weight.device

    def forward(self, x, attn_mask=None):
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, image_size, patch_size, width, layers, heads, mlp_ratio, n_queries=256, output_dim=512, **kwargs):
        super().__init__()
        self.image_size = (image_size, image_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size[0] * self.grid_size[1], width))
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.ln_pre = norm_layer(width)
        self.transformer = TransformerBlock(width, layers, heads, mlp_ratio, act_layer=nn.GELU, norm_layer=norm_layer)
        self.attn_pool = Resampler(
            grid_size=int(math.sqrt(n_queries)),
            embed_dim=output_dim,
            num_heads=output_dim // 128 or 1,  # deviation: the tiny model is narrower than one 128-wide head
            kv_dim=width,
            norm_layer=norm_layer,
        )
        self.ln_post = norm_layer(output_dim)
        self.proj = nn.Parameter((output_dim**-0.5) * torch.randn(output_dim, output_dim))

    def image_transform(self, image):
        """Bicubic resize to `image_size`, scale to [0, 1], normalise with the CLIP mean and std: `[3, H, W]`."""
        image = image.resize(self.image_size, Image.BICUBIC)
        pixels = torch.tensor(bytearray(image.tobytes()), dtype=torch.uint8).view(image.size[1], image.size[0], 3)
        pixels = pixels.permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(_MEAN).view(3, 1, 1)
        std = torch.tensor(_STD).view(3, 1, 1)
        return (pixels - mean) / std

    def forward(self, x):
        x = x.to(dtype=self.transformer.get_cast_dtype(), device=self.transformer.get_cast_device())
        x = self.conv1(x)  # [batch, width, grid, grid]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = x + get_abs_pos(self.positional_embedding, x.size(1))
        x = self.ln_pre(x).permute(1, 0, 2)  # sequence-first for the blocks
        x = self.transformer(x).permute(1, 0, 2)
        x = self.attn_pool(x)
        return self.ln_post(x) @ self.proj

    def encode(self, image_paths):
        images = []
        for path in image_paths:
            if path.startswith("http://") or path.startswith("https://"):
                image = Image.open(BytesIO(requests.get(path, timeout=30).content))
            else:
                image = Image.open(path)
            images.append(self.image_transform(image.convert("RGB")))
        return self(torch.stack(images, dim=0))
