"""Stand-in of Forge's backend/nn/flux.py: the FLUX transformer with Forge's names and data layouts.

Mirrored from Forge (dfdcbab6): class and attribute names, constructor arguments, the order in which
sub-modules run, keyword-only block calls, text-first joint sequence, RoPE tables `pe` of shape
[B, 1, L, D/2, 2, 2] (identity on text, whose ids are 0), row-major 2x2 patches, and the module-level
`attention(q, k, v, pe)` that the blocks look up at call time (so it can be swapped).

Simplified: layers use the stand-in's `Linear` directly (Forge swaps torch.nn.Linear while building);
RMSNorm casts its scale per call instead of replacing the Parameter when dtypes differ.
"""

import math

import torch
from torch import nn

from backend.attention import attention_function
from backend.operations import Linear
from backend.utils import fp16_fix


def attention(q, k, v, pe):
    """Joint attention: RoPE on q, k ([B, H, L, D]), then SDPA. Returns [B, L, H*D]."""
    q, k = apply_rope(q, k, pe)
    return attention_function(q, k, v, q.shape[1], skip_reshape=True)


def rope(pos, dim: int, theta: int):
    """Per-position 2x2 rotation matrices for one axis: pos [B, L] -> [B, L, dim/2, 2, 2] (float32)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    inv_freq = 1.0 / (theta**exponents)  # [dim/2]
    angles = pos.unsqueeze(-1) * inv_freq  # [B, L, dim/2]
    cos, sin = torch.cos(angles), torch.sin(angles)
    rot = torch.stack([cos, -sin, sin, cos], dim=-1)  # rows (cos, -sin), (sin, cos)
    return rot.view(*angles.shape, 2, 2).float()


def apply_rope(xq, xk, freqs_cis):
    """Rotate channel pairs (2i, 2i+1) of q and k ([B, H, L, D]) by freqs_cis [B, 1, L, D/2, 2, 2]."""

    def rotate(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)  # [B, H, L, D/2, 1, 2]
        out = freqs_cis[..., 0] * pairs[..., 0] + freqs_cis[..., 1] * pairs[..., 1]  # [B, H, L, D/2, 2]
        return out.reshape(*x.shape).type_as(x)

    return rotate(xq), rotate(xk)


def timestep_embedding(t, dim: int, max_period: int = 10000, time_factor: float = 1000.0):
    """Sinusoidal embedding [B, dim] of t [B] (scaled by time_factor), cos half first."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(t) if torch.is_floating_point(t) else emb


class EmbedND(nn.Module):
    def __init__(self, dim, theta, axes_dim):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = axes_dim

    def forward(self, ids):
        """ids [B, L, n_axes] -> pe [B, 1, L, sum(axes_dim)/2, 2, 2]."""
        tables = [rope(ids[..., axis], self.axes_dim[axis], self.theta) for axis in range(ids.shape[-1])]
        return torch.cat(tables, dim=-3).unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden_dim):
        super().__init__()
        self.in_layer = Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x):
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = None  # Forge keeps this attribute (for its memory profiler)
        self.scale = nn.Parameter(torch.ones(dim))
        self.eps = 1e-6
        self.normalized_shape = [dim]

    def forward(self, x):
        return torch.rms_norm(x, self.normalized_shape, self.scale.to(x.dtype), self.eps)


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q, k, v):
        """RMSNorm per head on q and k ([B, H, L, D]); v is ignored. Returns (q, k)."""
        q = self.query_norm(q)
        k = self.key_norm(k)
        return q.to(k), k.to(q)


def _split_heads(qkv, heads: int):
    """[B, L, 3*H*D] -> q, k, v each [B, H, L, D]."""
    batch, length, width = qkv.shape
    return qkv.view(batch, length, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4)


class SelfAttention(nn.Module):
    """Container of qkv / norm / proj. Its forward exists in Forge but the double blocks do not call it."""

    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = Linear(dim, dim)

    def forward(self, x, pe):
        q, k, v = _split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, v)
        return self.proj(attention(q, k, v, pe=pe))


class Modulation(nn.Module):
    def __init__(self, dim, double):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec):
        """vec [B, C] -> `multiplier` chunks of [B, 1, C] (shift, scale, gate [, shift2, scale2, gate2])."""
        return self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def _mlp(hidden_size: int, mlp_hidden_dim: int) -> nn.Sequential:
    return nn.Sequential(
        Linear(hidden_size, mlp_hidden_dim, bias=True),
        nn.GELU(approximate="tanh"),
        Linear(mlp_hidden_dim, hidden_size, bias=True),
    )


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio, qkv_bias=False):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(dim=hidden_size, num_heads=num_heads, qkv_bias=qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = _mlp(hidden_size, mlp_hidden_dim)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(dim=hidden_size, num_heads=num_heads, qkv_bias=qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden_dim)

    def forward(self, img, txt, vec, pe):
        """img [B, L_img, C], txt [B, L_txt, C], vec [B, C], pe [B, 1, L_txt+L_img, D/2, 2, 2]."""
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        img_in = (1 + img_scale1) * self.img_norm1(img) + img_shift1
        img_q, img_k, img_v = _split_heads(self.img_attn.qkv(img_in), self.num_heads)  # [B, H, L_img, D]
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_v)

        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)
        txt_in = (1 + txt_scale1) * self.txt_norm1(txt) + txt_shift1
        txt_q, txt_k, txt_v = _split_heads(self.txt_attn.qkv(txt_in), self.num_heads)  # [B, H, L_txt, D]
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v)

        # joint sequence, text first
        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, pe=pe)  # module-level name, looked up at call time; [B, L, H*D]
        n_txt = txt.shape[1]
        txt_out, img_out = attn[:, :n_txt], attn[:, n_txt:]

        img = img + img_gate1 * self.img_attn.proj(img_out)
        img = img + img_gate2 * self.img_mlp((1 + img_scale2) * self.img_norm2(img) + img_shift2)
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_out)
        txt = txt + txt_gate2 * self.txt_mlp((1 + txt_scale2) * self.txt_norm2(txt) + txt_shift2)
        return img, fp16_fix(txt)


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_scale=None):
        super().__init__()
        self.hidden_dim = hidden_size
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.scale = qk_scale or head_dim**-0.5
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)  # [q|k|v|mlp]
        self.linear2 = Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(head_dim)
        self.hidden_size = hidden_size
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x, vec, pe):
        """x [B, L_txt+L_img, C] (text first), vec [B, C]."""
        shift, scale, gate = self.modulation(vec)
        x_in = (1 + scale) * self.pre_norm(x) + shift
        qkv, mlp = torch.split(self.linear1(x_in), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = _split_heads(qkv, self.num_heads)  # [B, H, L, D]
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe=pe)  # [B, L, H*D]
        out = self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2))
        return fp16_fix(x + gate * out)


class LastLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)  # each [B, C]
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)


class IntegratedFluxTransformer2DModel(nn.Module):
    def __init__(
        self,
        in_channels: int,
        vec_in_dim: int,
        context_in_dim: int,
        hidden_size: int,
        mlp_ratio: float,
        num_heads: int,
        depth: int,
        depth_single_blocks: int,
        axes_dim: list[int],
        theta: int,
        qkv_bias: bool,
        guidance_embed: bool,
    ):
        super().__init__()
        self.guidance_embed = guidance_embed
        self.in_channels = in_channels * 4  # latent channels x 2 x 2 patch
        self.out_channels = self.in_channels
        if hidden_size % num_heads != 0:
            raise ValueError(f"stand-in FLUX: hidden size {hidden_size} is not a multiple of {num_heads} heads")
        pe_dim = hidden_size // num_heads
        if sum(axes_dim) != pe_dim:
            raise ValueError(f"stand-in FLUX: axes_dim {axes_dim} must sum to the head dim {pe_dim}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.pe_embedder = EmbedND(dim=pe_dim, theta=theta, axes_dim=axes_dim)
        self.img_in = Linear(self.in_channels, hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=hidden_size)
        self.vector_in = MLPEmbedder(vec_in_dim, hidden_size)
        self.guidance_in = MLPEmbedder(in_dim=256, hidden_dim=hidden_size) if guidance_embed else nn.Identity()
        self.txt_in = Linear(context_in_dim, hidden_size)
        self.double_blocks = nn.ModuleList(
            [DoubleStreamBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias) for _ in range(depth)]
        )
        self.single_blocks = nn.ModuleList(
            [SingleStreamBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth_single_blocks)]
        )
        self.final_layer = LastLayer(hidden_size, 1, self.out_channels)

    def inner_forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("stand-in FLUX: img and txt must be [B, L, C]")
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if self.guidance_embed:
            if guidance is None:
                raise ValueError("stand-in FLUX: a guidance-embedding model needs a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))  # text first
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        img = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            img = block(img, vec=vec, pe=pe)
        img = img[:, txt.shape[1] :, ...]
        return self.final_layer(img, vec)

    def forward(self, x, timestep, context, y, guidance=None, **kwargs):
        """x [B, C, h, w] latent; context [B, L_txt, ctx]; y [B, vec]. Extra kwargs (transformer_options,
        control) are accepted and dropped, as in Forge."""
        bs, _, h, w = x.shape
        patch = 2
        pad_h = (patch - h % patch) % patch
        pad_w = (patch - w % patch) % patch
        x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="circular")
        h_len, w_len = (h + 1) // patch, (w + 1) // patch
        # b c (h ph) (w pw) -> b (h w) (c ph pw): token r*w_len+c is the patch at rows 2r.., cols 2c..
        img = x.view(bs, x.shape[1], h_len, patch, w_len, patch).permute(0, 2, 4, 1, 3, 5)
        img = img.reshape(bs, h_len * w_len, -1)
        rows = torch.linspace(0, h_len - 1, steps=h_len, device=x.device, dtype=x.dtype)
        cols = torch.linspace(0, w_len - 1, steps=w_len, device=x.device, dtype=x.dtype)
        img_ids = torch.zeros((h_len, w_len, 3), device=x.device, dtype=x.dtype)
        img_ids[..., 1] += rows[:, None]
        img_ids[..., 2] += cols[None, :]
        img_ids = img_ids.reshape(1, h_len * w_len, 3).repeat(bs, 1, 1)  # (0, row, col)
        txt_ids = torch.zeros((bs, context.shape[1], 3), device=x.device, dtype=x.dtype)
        out = self.inner_forward(img, img_ids, context, txt_ids, timestep, y, guidance)  # [B, L_img, c*4]
        out = out.view(bs, h_len, w_len, -1, patch, patch).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(bs, -1, h_len * patch, w_len * patch)[:, :, :h, :w]
