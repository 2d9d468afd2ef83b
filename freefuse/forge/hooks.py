"""PyTorch hooks and sampler functions of a FreeFuse session: closures over the session, never bound methods.

Forge deep-copies ``model_options`` on every ``clone()``; a closure survives as the same object, a bound
method would drag a copy of its instance along. Every hook first checks that its session is the live one.
"""

from __future__ import annotations

from freefuse import call_weights as cw


def call_hook(session, grid_of):
    """Forward pre-hook (with kwargs) on the denoiser: tells the session a model call starts.

    Forge's KModel calls ``diffusion_model(x, t, context=..., transformer_options=..., ...)``.
    """

    def hook(module, args, kwargs):
        if session.live():
            x = args[0] if args else kwargs["x"]
            context = kwargs.get("context", args[2] if len(args) > 2 else None)
            session.begin_call(x.shape[0], kwargs.get("transformer_options") or {}, context.shape[1], grid_of(x))
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
        if layer.layout == "conv":
            weights = session.token_weights("conv", x, tuple(output.shape[-2:]))  # per output pixel
        else:
            weights = session.token_weights(layer.layout, x, session.level_grid)  # level grid: UNet only
        return cache[key].add_to(output, x, weights)

    return hook


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
