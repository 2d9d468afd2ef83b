"""Forge's IntegratedUNet2DConditionModel (backend/nn/unet.py), split out of the stand-in's unet.py.

Mirrored from Forge (dfdcbab6): the constructor's arguments and the module tree it builds, in
registration order: time_embed (Linear, SiLU, Linear), label_emb (num_classes "sequential": a
Sequential holding (Linear, SiLU, Linear) from adm_in_channels), input_blocks (a conv, then per level
`num_res_blocks` x [ResBlock (+ SpatialTransformer if transformer_depth > 0)] and a Downsample between
levels), middle_block (ResBlock, SpatialTransformer, ResBlock), output_blocks (per level, deepest first,
num_res_blocks + 1 x [ResBlock on the skip-concatenated input (+ SpatialTransformer) (+ Upsample at the
end of each level but the last)]), out (GroupNorm, SiLU, Conv2d). transformer_depth is consumed from the
front, transformer_depth_output from the back, as in Forge. forward(x, timesteps, context, y, control,
transformer_options) writes "original_shape", "transformer_index" and "block" into transformer_options
and runs the block patches / modifiers named in unet.py's docstring.

Simplified: `config` is a plain dict of the constructor arguments (Forge: diffusers ConfigMixin, later
replaced by the loader with huggingface_guess's unet_config); no "group_norm_wrapper"; no `_feature_size`.
"""

import torch
from torch import nn

from backend.nn.unet import (
    Downsample,
    ResBlock,
    SpatialTransformer,
    TimestepEmbedSequential,
    Upsample,
    apply_control,
    conv_nd,
    exists,
    timestep_embedding,
)
from backend.operations import Linear


def _modify(h, when: str, transformer_options: dict):
    for modifier in transformer_options.get("block_modifiers", []):
        h = modifier(h, when, transformer_options)
    return h


class IntegratedUNet2DConditionModel(nn.Module):
    config_name = "config.json"

    def __init__(
        self,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        num_heads=-1,
        num_head_channels=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_spatial_transformer=False,
        transformer_depth=1,
        context_dim=None,
        disable_self_attentions=None,
        num_attention_blocks=None,
        disable_middle_self_attn=False,
        use_linear_in_transformer=False,
        adm_in_channels=None,
        transformer_depth_middle=None,
        transformer_depth_output=None,
    ):
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if context_dim is not None:
            assert use_spatial_transformer
        assert num_heads != -1 or num_head_channels != -1
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        if isinstance(num_res_blocks, int):
            num_res_blocks = len(channel_mult) * [num_res_blocks]
        self.num_res_blocks = num_res_blocks
        transformer_depth = list(transformer_depth)
        transformer_depth_output = list(transformer_depth_output)
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            Linear(model_channels, time_embed_dim), nn.SiLU(), Linear(time_embed_dim, time_embed_dim)
        )
        if isinstance(num_classes, int):
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)
        elif num_classes == "continuous":
            self.label_emb = Linear(1, time_embed_dim)
        elif num_classes == "sequential":
            assert adm_in_channels is not None
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    Linear(adm_in_channels, time_embed_dim), nn.SiLU(), Linear(time_embed_dim, time_embed_dim)
                )
            )
        elif num_classes is not None:
            raise ValueError("stand-in unet: unsupported adm / num_classes setting")

        def res_block(channels, out, **kwargs):
            return ResBlock(
                channels=channels,
                emb_channels=time_embed_dim,
                dropout=dropout,
                out_channels=out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                **kwargs,
            )

        def transformer(ch, depth, level, disable_self_attn=None):
            heads, dim_head = (
                (num_heads, ch // num_heads)
                if num_head_channels == -1
                else (ch // num_head_channels, num_head_channels)
            )
            if disable_self_attn is None:
                disable_self_attn = disable_self_attentions[level] if exists(disable_self_attentions) else False
            return SpatialTransformer(
                ch,
                heads,
                dim_head,
                depth=depth,
                context_dim=context_dim,
                disable_self_attn=disable_self_attn,
                use_checkpoint=use_checkpoint,
                use_linear=use_linear_in_transformer,
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch = model_channels
        for level, mult in enumerate(channel_mult):
            for nr in range(num_res_blocks[level]):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                depth = transformer_depth.pop(0)
                if depth > 0 and (not exists(num_attention_blocks) or nr < num_attention_blocks[level]):
                    layers.append(transformer(ch, depth, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = (
                    res_block(ch, ch, down=True)
                    if resblock_updown
                    else Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)

        mid_block = [res_block(ch, None)]
        if transformer_depth_middle >= 0:
            mid_block += [
                transformer(ch, transformer_depth_middle, None, disable_middle_self_attn),
                res_block(ch, None),
            ]
        self.middle_block = TimestepEmbedSequential(*mid_block)

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks[level] + 1):
                ich = input_block_chans.pop()
                layers = [res_block(ch + ich, model_channels * mult)]
                ch = model_channels * mult
                depth = transformer_depth_output.pop()
                if depth > 0 and (not exists(num_attention_blocks) or i < num_attention_blocks[level]):
                    layers.append(transformer(ch, depth, level))
                if level and i == num_res_blocks[level]:
                    up = (
                        res_block(ch, ch, up=True)
                        if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=ch)
                    )
                    layers.append(up)
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            nn.GroupNorm(32, ch), nn.SiLU(), conv_nd(dims, model_channels, out_channels, 3, padding=1)
        )

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options=None, **kwargs):
        """x [B, C_in, h, w], timesteps [B], context [B, L, ctx], y [B, adm] -> [B, C_out, h, w]."""
        transformer_options = {} if transformer_options is None else transformer_options
        transformer_options["original_shape"] = list(x.shape)
        transformer_options["transformer_index"] = 0
        patches = transformer_options.get("patches", {})
        assert (y is not None) == (self.num_classes is not None)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))  # [B, 4*mc]
        if self.num_classes is not None:
            assert y.shape[0] == x.shape[0]
            emb = emb + self.label_emb(y)

        hs = []  # skip activations, one per input block
        h = x
        for index, module in enumerate(self.input_blocks):
            transformer_options["block"] = ("input", index)
            h = _modify(h, "before", transformer_options)
            h = module(h, emb, context, transformer_options)
            h = apply_control(h, control, "input")
            h = _modify(h, "after", transformer_options)
            for p in patches.get("input_block_patch", []):
                h = p(h, transformer_options)
            hs.append(h)
            for p in patches.get("input_block_patch_after_skip", []):
                h = p(h, transformer_options)

        transformer_options["block"] = ("middle", 0)
        h = _modify(h, "before", transformer_options)
        h = self.middle_block(h, emb, context, transformer_options)
        h = apply_control(h, control, "middle")
        h = _modify(h, "after", transformer_options)

        for index, module in enumerate(self.output_blocks):
            transformer_options["block"] = ("output", index)
            hsp = apply_control(hs.pop(), control, "output")
            for p in patches.get("output_block_patch", []):
                h, hsp = p(h, hsp, transformer_options)
            h = torch.cat([h, hsp], dim=1)
            output_shape = hs[-1].shape if hs else None  # Upsample matches the next skip's h x w
            h = _modify(h, "before", transformer_options)
            h = module(h, emb, context, transformer_options, output_shape)
            h = _modify(h, "after", transformer_options)

        transformer_options["block"] = ("last", 0)
        h = _modify(h, "before", transformer_options)
        h = self.out(h)
        h = _modify(h, "after", transformer_options)
        return h.type(x.dtype)
