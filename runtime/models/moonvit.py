"""MoonViT vision tower and the patch-merger projector of Kimi-K2.5.

Images of different sizes are packed into one flat patch sequence [N, ...] (no padding); only
attention looks at image boundaries. Shapes: N = patches of all images, D = vision hidden size,
hd = head dim, M = merged tokens (N / merge area).

Parameter names equal transformers' `model.vision_tower.*` / `model.mm_projector.*`; the original
release's fused, interleaved `wqkv` is converted on load (runtime/checkpoint/names.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from runtime.models.common import activation
from runtime.models.config import VisionConfig

Grid = tuple[int, int]  # (h, w) in patches, for one image


class PositionGrid(nn.Module):
    """Learned [H0, W0, D] position table, bicubically resampled to each image's (h, w)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.position_embeddings = nn.Parameter(torch.zeros(cfg.pos_emb_height, cfg.pos_emb_width, cfg.hidden_size))

    def forward(self, grids: Sequence[Grid]) -> torch.Tensor:
        table = self.position_embeddings.permute(2, 0, 1)[None].float()  # [1, D, H0, W0]
        resampled: dict[Grid, torch.Tensor] = {}
        for grid in set(grids):
            if grid == tuple(self.position_embeddings.shape[:2]):
                resampled[grid] = self.position_embeddings.flatten(0, 1).float()
                continue
            out = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
            resampled[grid] = out[0].permute(1, 2, 0).flatten(0, 1)  # [h*w, D], raster order
        return torch.cat([resampled[g] for g in grids])


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_emb = PositionGrid(cfg)

    def forward(self, pixels: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        """pixels [N, 3, patch, patch] -> [N, D]."""
        # A stride-patch convolution over one patch is a matmul; as one [N, 3*p*p] x [3*p*p, D] it
        # is 2.7x (float32) to 7x (bfloat16) faster on CPU than the convolution over N 1x1 outputs.
        x = F.linear(pixels.flatten(1), self.proj.weight.flatten(1), self.proj.bias)
        return x + self.pos_emb(grids).to(x.dtype)


class AxialRope(nn.Module):
    """2-D rope: the same frequencies for rows and columns, interleaved (w, h) per frequency and
    rotated over the whole head dim with rotate-half."""

    inv_freq: torch.Tensor

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        spatial = cfg.head_dim // 2
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, grids: Sequence[Grid]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, hd] for the raster-ordered patches of every image."""
        pos = torch.cat([_raster_positions(h, w) for h, w in grids]).to(self.inv_freq.device)  # [N, 2]
        freqs = pos[..., None].float() * self.inv_freq.float()  # [N, 2 (h, w), hd/4]
        freqs = freqs.transpose(1, 2).flip(-1).flatten(1)  # [N, hd/2]: w0, h0, w1, h1, ...
        freqs = torch.cat([freqs, freqs], dim=-1)
        return freqs.cos(), freqs.sin()


def _raster_positions(h: int, w: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d) for _ in range(3))
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, lengths: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = (p(x).view(n, self.heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = (self._rope(t, cos, sin) for t in (q, k))
        return self.proj(_attend_within_images(q, k, v, lengths).reshape(n, -1))

    @staticmethod
    def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t32, cos, sin = t.float(), cos[:, None, :], sin[:, None, :]
        return (t32 * cos + _rotate_half(t32) * sin).to(t.dtype)


def _attend_within_images(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """q, k, v [N, heads, hd] (images packed back to back) -> [N, heads, hd]: full attention within
    each image, none across images. Images of one size (a batch of same-sized images is the common
    case) go to SDPA as one [B, heads, L, hd] batch, others one by one; SDPA always gets 4-D input,
    which its fused CPU kernel takes (3-D input falls to the unfused path: 3x slower at 256 patches)."""
    if len(set(lengths)) == 1:
        b, length = len(lengths), lengths[0]
        return _sdpa(*(t.view(b, length, *t.shape[1:]) for t in (q, k, v))).flatten(0, 1)
    return torch.cat([_sdpa(qi[None], ki[None], vi[None])[0]
                      for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True)])


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, L, heads, hd] -> [B, L, heads, hd]."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-5)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-5)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, lengths: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), lengths, cos, sin)
        return x + self.mlp(self.norm2(x))


class MoonViT(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.rotary = AxialRope(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=1e-5)

    def forward(self, pixels: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        """pixels [N, 3, patch, patch] -> merge groups [M, kh*kw, D] (image after image)."""
        lengths = [h * w for h, w in grids]
        x = self.patch_embed(pixels, grids)
        cos, sin = self.rotary(grids)
        for layer in self.layers:
            x = layer(x, lengths, cos, sin)
        x = self.final_layernorm(x)
        return torch.cat([self._merge_groups(xi, g) for xi, g in zip(x.split(lengths), grids, strict=True)])

    def _merge_groups(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """[h*w, D] raster -> [h*w/(kh*kw), kh*kw, D]: each kh x kw window becomes one group."""
        (h, w), (kh, kw) = grid, self.cfg.merge_kernel_size
        x = x.view(h // kh, kh, w // kw, kw, -1).permute(0, 2, 1, 3, 4)
        return x.reshape((h // kh) * (w // kw), kh * kw, -1)


class PatchMergerProjector(nn.Module):
    """LayerNorm per patch, concatenate each merge window, Linear, GELU, Linear."""

    def __init__(self, cfg: VisionConfig, text_hidden_size: int):
        super().__init__()
        merged = cfg.hidden_size * cfg.merge_area
        self.pre_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.projector_ln_eps)
        self.in_proj = nn.Linear(merged, merged)
        self.out_proj = nn.Linear(merged, text_hidden_size)

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        """[M, kh*kw, D] -> [M, text hidden]."""
        x = self.pre_norm(groups).reshape(groups.shape[0], -1)
        return self.out_proj(F.gelu(self.in_proj(x)))


class VisionTower(nn.Module):
    """MoonViT + projector: packed patches of several images -> one embedding tensor per image."""

    def __init__(self, cfg: VisionConfig, text_hidden_size: int):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = MoonViT(cfg)
        self.mm_projector = PatchMergerProjector(cfg, text_hidden_size)

    def forward(self, pixels: torch.Tensor, grids: Sequence[Grid]) -> list[torch.Tensor]:
        embeds = self.mm_projector(self.vision_tower(pixels, grids))
        return list(embeds.split([h * w // self.cfg.merge_area for h, w in grids]))
