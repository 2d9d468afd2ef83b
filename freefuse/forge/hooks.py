"""PyTorch hooks and sampler functions of a FreeFuse session: closures over the session, never bound methods.

Forge deep-copies ``model_options`` on every ``clone()``; a closure survives as the same object, a bound
method would drag a copy of its instance along. Every hook first checks that its session is the live one.
"""

from __future__ import annotations

from freefuse import call_weights as cw


def install_call_hooks(session, diffusion_model, grid_of) -> None:
    """Tell the session when a call of this denoiser starts and ends (also when it raises).

    Forge's KModel calls ``diffusion_model(x, t, context=..., transformer_options=..., ...)``. Outside a call
    ``session.call`` is None, so the module-level attention swap does nothing for any other model (a new
    checkpoint loaded after a generation that raised, a ControlNet, a refiner).
    """

    def begin(module, args, kwargs):
        if session.live():
            x = args[0] if args else kwargs["x"]
            context = kwargs.get("context", args[2] if len(args) > 2 else None)
            session.begin_call(x.shape[0], kwargs.get("transformer_options") or {}, context.shape[1], grid_of(x))
        return None

    def end(module, args, output):
        session.call = None
        return None

    session.add_handle(diffusion_model.register_forward_pre_hook(begin, with_kwargs=True))
    session.add_handle(diffusion_model.register_forward_hook(end, always_call=True))


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
        delta, fusion = cache[key], session.fusion
        if fusion is not None and session.call.mode == cw.MASKED and fusion.applies(layer):
            ranks = delta.ranks(x)  # shared by the selection and the delta itself
            return delta.add_to(output, x, fusion.weights(layer, delta, x, output, ranks, weights), ranks=ranks)
        return delta.add_to(output, x, weights)

    return hook


def step_input_modifier(session):
    """First conditioning modifier: remembers the x that Forge's sampling_function evaluates this step.

    Modifiers after it may evaluate the model on other latents (reference ControlNet does, through
    sampling_function_inner); only the evaluation of this very x is the generation's own.
    """

    def modifier(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        if session.live():
            session.step_input = x
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    return modifier


def main_eval_mark(session):
    """First pre-CFG function: marks the generation's own evaluation of the step (its x is still the one the
    conditioning modifiers saw; later pre-CFG functions, ControlNet inpaint's say, may replace x)."""

    def pre_cfg(model, cond, uncond, x, timestep, model_options):
        if session.live():
            session.in_main_eval = x is session.step_input
        return model, cond, uncond, x, timestep, model_options

    return pre_cfg


def phase1_runner(session):
    """Last pre-CFG function: the restart schedule's phase 1, in the generation's own evaluation only, on the x
    every other pre-CFG function has prepared."""

    def pre_cfg(model, cond, uncond, x, timestep, model_options):
        if session.live() and session.in_main_eval and not session.phase1_done:
            session.run_phase1(model, cond, x, timestep, model_options)
        return model, cond, uncond, x, timestep, model_options

    return pre_cfg


def refine_step(session):
    """Post-CFG function (before main_eval_end): latent refinement of the generation's own evaluation."""

    def post_cfg(args):
        if session.live() and session.in_main_eval and session.refinement is not None:
            return session.refine_x0(args["denoised"], args["sigma"])
        return args["denoised"]

    return post_cfg


def main_eval_end(session):
    """Post-CFG function: the paper method's superpixel voting on the capture step's x0, then end the mark."""

    def post_cfg(args):
        if session.live():
            if session.in_main_eval and session.pending_maps is not None:
                session.finish_with_x0(args["cond_denoised"])
            session.in_main_eval = False
        return args["denoised"]

    return post_cfg
