"""Stand-in of Forge's backend/nn/unet.py: the SD/SDXL UNet with Forge's module tree and patch points.

Mirrored from Forge (dfdcbab6): class names, constructor arguments, the order in which sub-modules are
registered (so state-dict keys and their order match real SDXL checkpoints: input_blocks.N.M...,
middle_block..., output_blocks.N.M.transformer_blocks.K.attn2.to_q, out.2), and the forward pass:
`transformer_options["original_shape"]`, `["transformer_index"]`, `["block"] = ("input"|"middle"|
"output"|"last", id)` and `["block_index"]` (index of the BasicTransformerBlock inside its
SpatialTransformer) are written into the dict the caller passes; BasicTransformerBlock._forward handles
`patches` (attn1_patch, attn1_output_patch, middle_patch, attn2_patch, attn2_output_patch) and
`patches_replace` for attn1/attn2 keyed (block_name, id, block_index) with fallback (block_name, id);
the UNet runs input_block_patch(_after_skip), output_block_patch, block_modifiers and ControlNet
residuals (`control`). CrossAttention.forward calls the module-level name `attention_function`, bound by
`from backend.attention import attention_function` as in Forge, so it is looked up in THIS module's
globals at call time (replace `backend.nn.unet.attention_function` to swap it).

Simplified: layers use the stand-in's Linear / Conv2d directly (Forge swaps torch.nn classes while
building); GroupNorm / LayerNorm / Embedding are torch's own; only dims=2; no "group_norm_wrapper";
BasicTransformerBlock without ff_in / inner_dim; ResBlock without exchange_temb_dims; no gradient
checkpointing. Split for file size: ResBlock / Upsample / Downsample / helpers are in unet_blocks.py
and IntegratedUNet2DConditionModel in unet_model.py; all are reachable as attributes of this module.
"""

import torch
from torch import nn

from backend.attention import attention_function
from backend.nn.unet_blocks import (  # noqa: F401 (re-exported: Forge defines them in unet.py)
    Downsample,
    ResBlock,
    TimestepBlock,
    Upsample,
    apply_control,
    avg_pool_nd,
    conv_nd,
    timestep_embedding,
)
from backend.operations import Conv2d, Linear


def exists(val):
    return val is not None


def default(val, d):
    return val if exists(val) else d


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x, emb, context=None, transformer_options=None, output_shape=None):
        transformer_options = {} if transformer_options is None else transformer_options
        inner_modifiers = transformer_options.get("block_inner_modifiers", [])
        for layer_index, layer in enumerate(self):
            for modifier in inner_modifiers:
                x = modifier(x, "before", layer, layer_index, self, transformer_options)
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb, transformer_options)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, transformer_options)
                if "transformer_index" in transformer_options:
                    transformer_options["transformer_index"] += 1
            elif isinstance(layer, Upsample):
                x = layer(x, output_shape=output_shape)
            else:
                x = layer(x)
            for modifier in inner_modifiers:
                x = modifier(x, "after", layer, layer_index, self, transformer_options)
        return x


class Timestep(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        return timestep_embedding(t, self.dim)


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * torch.nn.functional.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, dim_out=None, mult=4, glu=False, dropout=0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = default(dim_out, dim)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), Linear(inner_dim, dim_out))

    def forward(self, x):
        return self.net(x)


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = default(context_dim, query_dim)
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = Linear(query_dim, inner_dim, bias=False)
        self.to_k = Linear(context_dim, inner_dim, bias=False)
        self.to_v = Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None, value=None, mask=None, transformer_options=None):
        """x [B, N, C]; context [B, L, ctx] (self-attention when None). Returns [B, N, C]."""
        q = self.to_q(x)  # [B, N, H*D]
        context = default(context, x)
        k = self.to_k(context)  # [B, L, H*D]
        v = self.to_v(value if value is not None else context)
        out = attention_function(q, k, v, self.heads, mask)  # module global, looked up per call
        return self.to_out(out)


def _replace_key(replace_patches: dict, block, block_index):
    """Forge's lookup: (block_name, id, block_index) first, then (block_name, id); None if neither."""
    full = (block[0], block[1], block_index) if block is not None else None
    if full in replace_patches:
        return full
    return block if block in replace_patches else None


class BasicTransformerBlock(nn.Module):
    def __init__(
        self,
        dim,
        n_heads,
        d_head,
        dropout=0.0,
        context_dim=None,
        gated_ff=True,
        checkpoint=True,
        ff_in=False,
        inner_dim=None,
        disable_self_attn=False,
    ):
        super().__init__()
        if ff_in or inner_dim is not None:
            raise NotImplementedError("stand-in unet: BasicTransformerBlock without ff_in / inner_dim")
        self.ff_in = False
        self.is_res = True
        self.disable_self_attn = disable_self_attn
        attn1_context = context_dim if disable_self_attn else None
        self.attn1 = CrossAttention(dim, context_dim=attn1_context, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dim_out=dim, dropout=dropout, glu=gated_ff)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint
        self.n_heads = n_heads
        self.d_head = d_head

    def forward(self, x, context=None, transformer_options=None):
        return self._forward(x, context, {} if transformer_options is None else transformer_options)

    def _attention(self, attn, name, n, context, value, patches, replace_patches, block, block_index, extra):
        """One attention (attn1 or attn2) with its `<name>_patch` list and `<name>` replace patch."""
        if f"{name}_patch" in patches:
            if context is None:
                context = n
            value = context
            for p in patches[f"{name}_patch"]:
                n, context, value = p(n, context, value, extra)
        replace = replace_patches.get(name, {})
        key = _replace_key(replace, block, block_index)
        if key is None:
            return attn(n, context=context, value=value, transformer_options=extra)
        if context is None:
            context = n
        if value is None:
            value = context
        q, k, v = attn.to_q(n), attn.to_k(context), attn.to_v(value)  # [B, N, H*D], [B, L, H*D] x2
        return attn.to_out(replace[key](q, k, v, extra))

    def _forward(self, x, context, transformer_options):
        """x [B, N, C] image tokens (row-major h x w); context [B, L, ctx]."""
        block = transformer_options.get("block", None)
        block_index = transformer_options.get("block_index", 0)
        patches = transformer_options.get("patches", {})
        replace_patches = transformer_options.get("patches_replace", {})
        extra = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
        extra["n_heads"] = self.n_heads
        extra["dim_head"] = self.d_head
        where = (patches, replace_patches, block, block_index, extra)

        attn1_context = context if self.disable_self_attn else None
        n = self._attention(self.attn1, "attn1", self.norm1(x), attn1_context, None, *where)
        for p in patches.get("attn1_output_patch", []):
            n = p(n, extra)
        x += n
        for p in patches.get("middle_patch", []):
            x = p(x, extra)
        n = self._attention(self.attn2, "attn2", self.norm2(x), context, None, *where)
        for p in patches.get("attn2_output_patch", []):
            n = p(n, extra)
        x += n
        x_skip = x
        x = self.ff(self.norm3(x))
        x += x_skip
        return x


class SpatialTransformer(nn.Module):
    def __init__(
        self,
        in_channels,
        n_heads,
        d_head,
        depth=1,
        dropout=0.0,
        context_dim=None,
        disable_self_attn=False,
        use_linear=False,
        use_checkpoint=True,
    ):
        super().__init__()
        if exists(context_dim) and not isinstance(context_dim, list):
            context_dim = [context_dim] * depth
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        self.proj_in = Linear(in_channels, inner_dim) if use_linear else Conv2d(in_channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    inner_dim,
                    n_heads,
                    d_head,
                    dropout=dropout,
                    context_dim=context_dim[d],
                    disable_self_attn=disable_self_attn,
                    checkpoint=use_checkpoint,
                )
                for d in range(depth)
            ]
        )
        # Forge writes Linear(in_channels, inner_dim) here; equal sizes in every SD/SDXL config
        self.proj_out = Linear(in_channels, inner_dim) if use_linear else Conv2d(inner_dim, in_channels, 1)
        self.use_linear = use_linear

    def forward(self, x, context=None, transformer_options=None):
        """x [B, C, h, w] -> tokens [B, h*w, C] (row-major) through the blocks -> [B, C, h, w] + x."""
        transformer_options = {} if transformer_options is None else transformer_options
        if not isinstance(context, list):
            context = [context] * len(self.transformer_blocks)
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1).contiguous()  # [B, h*w, C]
        if self.use_linear:
            x = self.proj_in(x)
        for i, block in enumerate(self.transformer_blocks):
            transformer_options["block_index"] = i
            x = block(x, context=context[i], transformer_options=transformer_options)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()  # [B, C, h, w]
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


def __getattr__(name: str):
    """IntegratedUNet2DConditionModel lives in unet_model.py (file size) but is reachable here, as in Forge."""
    if name == "IntegratedUNet2DConditionModel":
        from backend.nn.unet_model import IntegratedUNet2DConditionModel

        return IntegratedUNet2DConditionModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
