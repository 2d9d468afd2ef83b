"""The convolutional parts of Forge's backend/nn/unet.py: ResBlock, Upsample, Downsample and helpers.

Forge keeps these in unet.py; the stand-in splits them out for file size and re-exports every name from
backend.nn.unet, so `backend.nn.unet.ResBlock` is this class. Mirrored from Forge (dfdcbab6):
constructor arguments, sub-module names and registration order (ResBlock: in_layers = [GroupNorm(32),
SiLU, Conv2d 3x3], emb_layers = [SiLU, Linear], out_layers = [GroupNorm(32), SiLU, Dropout, Conv2d
3x3], skip_connection = Identity or 1x1 Conv2d; Downsample.op = Conv2d 3x3 stride 2 padding 1;
Upsample.conv = Conv2d 3x3 after nearest interpolation to `output_shape` when given, else 2x).

Simplified: only dims=2; no "group_norm_wrapper" transformer option; no exchange_temb_dims; no
gradient checkpointing.
"""

import math

import torch
from torch import nn

from backend.operations import Conv2d, Linear


def conv_nd(dims, *args, **kwargs):
    if dims != 2:
        raise NotImplementedError(f"stand-in unet: only 2-D convolutions, not dims={dims}")
    return Conv2d(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    if dims != 2:
        raise NotImplementedError(f"stand-in unet: only 2-D pooling, not dims={dims}")
    return nn.AvgPool2d(*args, **kwargs)


def apply_control(h, control, name):
    """Add the last ControlNet residual queued under `name` (popped) to h, in place."""
    if control is not None and name in control and len(control[name]) > 0:
        ctrl = control[name].pop()
        if ctrl is not None:
            h += ctrl
    return h


def timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False):
    """Sinusoidal embedding [B, dim] of timesteps [B] (not rescaled), cos half first, as Forge / kohya."""
    if repeat_only:
        return timesteps[:, None].expand(-1, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]  # [B, half]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepBlock(nn.Module):
    """Marker: TimestepEmbedSequential calls these as layer(x, emb, transformer_options)."""


class Upsample(nn.Module):
    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x, output_shape=None):
        """x [B, C, h, w] -> nearest to output_shape[2:] (the matching skip's size) or [2h, 2w]."""
        assert x.shape[1] == self.channels
        shape = [x.shape[2] * 2, x.shape[3] * 2]
        if output_shape is not None:
            shape = [output_shape[2], output_shape[3]]
        x = torch.nn.functional.interpolate(x, size=shape, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=2, padding=padding)
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=2, stride=2)

    def forward(self, x):
        """x [B, C, h, w] -> [B, C', ceil(h/2), ceil(w/2)] (conv) or floor (pooling)."""
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
        kernel_size=3,
        exchange_temb_dims=False,
        skip_t_emb=False,
    ):
        super().__init__()
        if exchange_temb_dims or isinstance(kernel_size, list):
            raise NotImplementedError("stand-in ResBlock: no exchange_temb_dims / per-axis kernel sizes")
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.exchange_temb_dims = False
        padding = kernel_size // 2
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, kernel_size, padding=padding),
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.skip_t_emb = skip_t_emb
        if skip_t_emb:
            self.emb_layers = None
        else:
            emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
            self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            conv_nd(dims, self.out_channels, self.out_channels, kernel_size, padding=padding),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, kernel_size, padding=padding)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb, transformer_options=None):
        """x [B, C, h, w], emb [B, E] -> [B, C_out, h', w']."""
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = None
        if not self.skip_t_emb:
            emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]  # [B, C_out(*2), 1, 1]
        if self.use_scale_shift_norm:
            h = self.out_layers[0](h)
            if emb_out is not None:
                scale, shift = torch.chunk(emb_out, 2, dim=1)
                h = h * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            if emb_out is not None:
                h = h + emb_out
            h = self.out_layers(h)
        return self.skip_connection(x) + h
