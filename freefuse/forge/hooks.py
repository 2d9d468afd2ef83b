"""PyTorch hooks and sampler functions of a FreeFuse session: closures over the session, never bound methods.

Forge deep-copies ``model_options`` on every ``clone()``; a closure survives as the same object, a bound
method would drag a copy of its instance along. Every hook first checks that its session is the live one.
"""

from __future__ import annotations

from freefuse import call_weights as cw
from freefuse.forge import flux as flux_layer
from freefuse.masks import Capture


def call_hook(session):
    def hook(module, args, kwargs):
        if session.live():
            x = args[0] if args else kwargs["x"]
            context = kwargs.get("context", args[2] if len(args) > 2 else None)
            session.begin_call(x, context, kwargs.get("transformer_options") or {})
        return None

    return hook


def block_hook(session, kind: str, index: int):
    def hook(module, args):
        if session.live():
            session.current_block = (kind, index)
        return None

    return hook


def lora_hook(session, layer):
    cache: dict = {}

    def hook(module, args, output):
        if not session.live() or session.call is None or session.call.mode == cw.OFF:
            return None
        x = args[0]
        key = (x.device, x.dtype)
        if key not in cache:
            cache.clear()
            cache[key] = layer.delta.to(device=x.device, dtype=x.dtype)
        weights = session.token_weights(layer.layout, x)
        return cache[key].add_to(output, x, weights)

    return hook


def attention(session, original, apply_rope):
    def attention(q, k, v, pe):
        if not session.live() or session.call is None:
            return original(q, k, v, pe)
        call = session.call
        if call.capture and session.current_block == ("double", session.settings.capture_block):
            out = original(q, k, v, pe)
            _capture(session, q, k, pe, out)
            return out
        bias = session.attention_bias(q)
        if bias is None:
            return original(q, k, v, pe)
        return flux_layer.biased_attention(apply_rope, q, k, v, pe, bias)

    return attention


def _capture(session, q, k, pe, out) -> None:
    call = session.call
    import backend.nn.flux as flux_module

    rows = cw.cond_rows(call.shape)
    n_txt = call.shape.n_txt
    q_r, k_r = flux_module.apply_rope(q[rows], k[rows], pe[rows] if pe.shape[0] > 1 else pe)
    q_r, k_r = q_r.float(), k_r.float()
    capture = Capture(
        q_img=q_r[:, :, n_txt:],
        k_img=k_r[:, :, n_txt:],
        k_txt=k_r[:, :, :n_txt],
        q_txt=q_r[:, :, :n_txt],
        o_img=out[rows, n_txt:].float(),
        grid_hw=call.grid_hw,
    )
    session.on_capture(capture)


def phase1_function(session):
    def pre_cfg(model, cond, uncond, x, timestep, model_options):
        if session.live() and not session.phase1_done:
            session.run_phase1(model, cond, x, timestep, model_options)
        return model, cond, uncond, x, timestep, model_options

    return pre_cfg


def x0_function(session):
    def post_cfg(args):
        if session.live() and session.pending_maps is not None:
            session.finish_with_x0(args["cond_denoised"])
        return args["denoised"]

    return post_cfg


def resolve(model, module_path: str):
    obj = model
    for name in module_path.split("."):
        obj = getattr(obj, name)
    return obj
