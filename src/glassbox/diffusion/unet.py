"""The denoising network: a conditioned U-Net, one file, top to bottom.

    x_t (B, C, H, W), t (B,), condition  ->  prediction (B, C, H, W)  (eps or v)

* the timestep becomes a sinusoidal embedding and an MLP (``emb``, width 4 * channels);
* a class label (digits) or the pooled prompt (shapes) is added to ``emb``; ``emb``
  modulates every residual block by a per-channel scale and shift (FiLM);
* at the low resolutions listed in ``attn_resolutions`` an attention block does
  self-attention over the pixels and cross-attention from the pixels to the prompt's
  token states, so words like "left" or "triangle" can steer particular places;
* the encoder halves the resolution per level, the decoder doubles it back and reads
  the encoder's activations through skip connections.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glassbox.errors import GlassboxError


@dataclass
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    channels: int = 32  # width at full resolution; level i has channels * channel_mults[i]
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1  # per level, in the encoder (the decoder has one more)
    attn_resolutions: tuple[int, ...] = (16, 8)  # feature-map sizes that get attention
    heads: int = 4
    groups: int = 8  # GroupNorm groups
    dropout: float = 0.0
    num_classes: int = 0  # > 0: class-conditioned; label num_classes means "no class"
    context_dim: int = 0  # > 0: cross-attention over text states of this width

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key in ("channel_mults", "attn_resolutions"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def validate(self) -> None:
        levels = len(self.channel_mults)
        if self.image_size % (2 ** (levels - 1)):
            raise GlassboxError(
                f"image_size={self.image_size} must be divisible by {2 ** (levels - 1)} for "
                f"{levels} U-Net levels; pick a multiple of {2 ** (levels - 1)} (16, 32, 64)."
            )
        for m in self.channel_mults:
            if (self.channels * m) % self.groups:
                raise GlassboxError(
                    f"channels * mult = {self.channels * m} is not divisible by groups="
                    f"{self.groups}; use a channel count that is a multiple of {self.groups}."
                )


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """GN-SiLU-conv, FiLM by the embedding, GN-SiLU-dropout-conv, plus a skip path."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)  # -> per-channel (scale, shift)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W pixels, then cross-attention to the prompt (if any)."""

    def __init__(self, channels: int, heads: int, groups: int, context_dim: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.cross = context_dim > 0
        if self.cross:
            self.norm_x = nn.LayerNorm(channels)
            self.q = nn.Linear(channels, channels)
            self.kv = nn.Linear(context_dim, 2 * channels)
            self.proj_x = nn.Linear(channels, channels)
            nn.init.zeros_(self.proj_x.weight)
            nn.init.zeros_(self.proj_x.bias)

    def _heads(self, z: torch.Tensor) -> torch.Tensor:
        B, N, C = z.shape  # (B, N, C) -> (B, heads, N, C/heads)
        return z.view(B, N, self.heads, C // self.heads).transpose(1, 2)

    def _merge(self, z: torch.Tensor) -> torch.Tensor:
        B, _, N, _ = z.shape
        return z.transpose(1, 2).reshape(B, N, -1)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))
        tokens = x.flatten(2).transpose(1, 2) + self.proj(self._merge(y))  # (B, HW, C)
        if self.cross and context is not None:
            q = self._heads(self.q(self.norm_x(tokens)))  # (B, heads, HW, C/heads)
            k, v = (self._heads(z) for z in self.kv(context).chunk(2, dim=-1))  # (B, h, L, .)
            mask = None if context_mask is None else context_mask[:, None, None, :]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            tokens = tokens + self.proj_x(self._merge(y))
        return tokens.transpose(1, 2).reshape(B, C, H, W)


class UNet(nn.Module):
    """Predicts eps or v from (x_t, t) under an optional class or text condition."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        emb_dim = 4 * c.channels
        self.time_mlp = nn.Sequential(
            nn.Linear(c.channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if c.num_classes > 0:  # one extra row: the "unconditional" label for guidance
            self.class_emb = nn.Embedding(c.num_classes + 1, emb_dim)
        if c.context_dim > 0:  # the pooled prompt joins the timestep embedding
            self.context_pool = nn.Linear(c.context_dim, emb_dim)

        widths = [c.channels * m for m in c.channel_mults]
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)

        def res(a: int, b: int) -> ResBlock:
            return ResBlock(a, b, emb_dim, c.groups, c.dropout)

        def attn(ch: int, size: int) -> nn.Module | None:
            if size in c.attn_resolutions:
                return AttentionBlock(ch, c.heads, c.groups, c.context_dim)
            return None

        # Encoder: per level num_res_blocks (res, attn?) pairs, then a strided downsample.
        self.down = nn.ModuleList()
        skip_widths = [widths[0]]
        ch, size = widths[0], c.image_size
        for level, w in enumerate(widths):
            for _ in range(c.num_res_blocks):
                self.down.append(nn.ModuleList([res(ch, w), attn(w, size) or nn.Identity()]))
                ch = w
                skip_widths.append(ch)
            if level < len(widths) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skip_widths.append(ch)
                size //= 2

        self.mid1 = res(ch, ch)
        self.mid_attn = AttentionBlock(ch, c.heads, c.groups, c.context_dim)
        self.mid2 = res(ch, ch)

        # Decoder: per level num_res_blocks + 1 blocks, each eating one skip, then upsample.
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            w = widths[level]
            for _ in range(c.num_res_blocks + 1):
                self.up.append(
                    nn.ModuleList([res(ch + skip_widths.pop(), w), attn(w, size) or nn.Identity()])
                )
                ch = w
            if level > 0:
                self.up.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, padding=1)]))
                size *= 2

        self.norm_out = nn.GroupNorm(c.groups, ch)
        self.conv_out = nn.Conv2d(ch, c.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, H, W), t (B,), labels (B,), context (B, L, D), mask (B, L) -> (B, C, H, W)."""
        c = self.config
        emb = self.time_mlp(timestep_embedding(t, c.channels))  # (B, E)
        if c.num_classes > 0:
            if class_labels is None:  # no label given: the unconditional row
                class_labels = torch.full_like(t, c.num_classes, dtype=torch.long)
            emb = emb + self.class_emb(class_labels)
        if c.context_dim > 0 and context is not None:
            m = (
                torch.ones(context.shape[:2], device=x.device)
                if context_mask is None
                else context_mask.to(context.dtype)
            )
            pooled = (context * m[..., None]).sum(1) / m.sum(1, keepdim=True)  # (B, D)
            emb = emb + self.context_pool(pooled)

        def run(block: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
            h = block[0](h, emb)
            if isinstance(block[1], AttentionBlock):
                h = block[1](h, context, context_mask)
            return h

        h = self.conv_in(x)  # (B, C0, H, W)
        skips = [h]
        for block in self.down:
            h = block[0](h) if len(block) == 1 else run(block, h)  # downsample or res(+attn)
            skips.append(h)

        h = self.mid1(h, emb)
        h = self.mid_attn(h, context, context_mask)
        h = self.mid2(h, emb)

        for block in self.up:
            if len(block) == 1:  # upsample: nearest neighbour, then a 3x3 conv
                h = block[0](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            else:
                h = run(block, torch.cat([h, skips.pop()], dim=1))
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers.

    Sampling from the averaged weights gives visibly cleaner images than the raw
    weights after a short run. The decay warms up as ``min(decay, (1 + n) / (10 + n))``
    so the average is not stuck at the random initialisation early on.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.detach(), 1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow
