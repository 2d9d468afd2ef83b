"""Stand-in of Forge's backend/sampling/sampling_function.py (sampling_function_inner and the batching).

Mirrored from Forge (dfdcbab6):
- `cond` / `uncond` are lists of compiled conditions (backend.sampling.condition.compile_conditions);
  `model` is the KModel (`unet.model`), not the patcher.
- `sampling_function_inner`: with cond_scale == 1 (and no disable_cfg1_optimization) uncond is dropped;
  every `sampler_pre_cfg_function` runs first as fn(model, cond, uncond, x, timestep, model_options) and
  returns that 6-tuple; then `calc_cond_uncond_batch`; then `sampler_cfg_function` or
  uncond + (cond - uncond) * cond_scale (times the cond strengths' sum when that is not 1); then every
  `sampler_post_cfg_function(args)`.
- `calc_cond_uncond_batch`: all concatenable entries run in one call in reverse order, so with cond
  and uncond the batch is [uncond rows, cond rows] and cond_or_uncond == [1, 0]; transformer_options is
  a shallow copy of model_options["transformer_options"] plus cond_or_uncond, sigmas (= timestep, [B]),
  cond_mark, cond_indices, uncond_indices; the call is `model_function_wrapper(model.apply_model,
  {...})` when set, else `model.apply_model(x, t, c_crossattn=..., y=..., guidance=...,
  transformer_options=...)`, which calls `diffusion_model(x, t, context=, control=None,
  transformer_options=, y=, guidance=)`.

Simplified: no areas, masks, timestep_start/end or ControlNet on conditions (every entry covers the
whole latent with weight 1); no memory-based splitting of the batch (Forge splits only when free memory
is short, which does not happen for the tiny test model); no per-condition `patches`.
"""

import math

import torch

COND = 0
UNCOND = 1


def compute_cond_mark(cond_or_uncond, sigmas):
    rows = int(sigmas.shape[0])
    return torch.Tensor([flag for flag in cond_or_uncond for _ in range(rows)]).to(sigmas)


def compute_cond_indices(cond_or_uncond, sigmas):
    rows = int(sigmas.shape[0])
    cond_indices, uncond_indices = [], []
    for chunk, flag in enumerate(cond_or_uncond):
        (cond_indices if flag == COND else uncond_indices).extend(range(chunk * rows, (chunk + 1) * rows))
    return cond_indices, uncond_indices


def _prepare(entry, x_in):
    """(input_x, conditioning) for one compiled condition that covers the whole latent."""
    conditioning = {
        name: c.process_cond(batch_size=x_in.shape[0], device=x_in.device) for name, c in entry["model_conds"].items()
    }
    return x_in, conditioning


def _concatenable(a, b):
    (x_a, c_a), (x_b, c_b) = a, b
    if x_a.shape != x_b.shape or c_a.keys() != c_b.keys():
        return False
    return all(c_a[name].can_concat(c_b[name]) for name in c_a)


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    out_cond = torch.zeros_like(x_in)
    out_count = torch.ones_like(x_in) * 1e-37
    out_uncond = torch.zeros_like(x_in)
    out_uncond_count = torch.ones_like(x_in) * 1e-37

    to_run = [(_prepare(entry, x_in), COND) for entry in cond]
    if uncond is not None:
        to_run += [(_prepare(entry, x_in), UNCOND) for entry in uncond]

    while to_run:
        first = to_run[0][0]
        batch_positions = [i for i in range(len(to_run)) if _concatenable(to_run[i][0], first)]
        batch_positions.reverse()  # pop from the back: uncond (appended last) comes first
        picked = [to_run.pop(i) for i in batch_positions]

        input_x = torch.cat([item[0][0] for item in picked])
        cond_or_uncond = [item[1] for item in picked]
        chunks = len(cond_or_uncond)
        per_name = {}
        for (_, conditioning), _ in picked:
            for name, c in conditioning.items():
                per_name.setdefault(name, []).append(c)
        c = {name: parts[0].concat(parts[1:]) for name, parts in per_name.items()}
        timestep_ = torch.cat([timestep] * chunks)

        transformer_options = model_options.get("transformer_options", {}).copy()
        transformer_options["cond_or_uncond"] = cond_or_uncond[:]
        transformer_options["sigmas"] = timestep
        transformer_options["cond_mark"] = compute_cond_mark(cond_or_uncond, timestep)
        cond_idx, uncond_idx = compute_cond_indices(cond_or_uncond, timestep)
        transformer_options["cond_indices"], transformer_options["uncond_indices"] = cond_idx, uncond_idx
        c["transformer_options"] = transformer_options

        if "model_function_wrapper" in model_options:
            output = model_options["model_function_wrapper"](
                model.apply_model,
                {"input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": cond_or_uncond},
            ).chunk(chunks)
        else:
            output = model.apply_model(input_x, timestep_, **c).chunk(chunks)

        for out, flag in zip(output, cond_or_uncond, strict=True):
            if flag == COND:
                out_cond += out
                out_count += 1.0
            else:
                out_uncond += out
                out_uncond_count += 1.0

    return out_cond / out_count, out_uncond / out_uncond_count


def sampling_function_inner(
    model, x, timestep, uncond, cond, cond_scale, model_options=None, seed=None, return_full=False
):
    model_options = {} if model_options is None else model_options
    edit_strength = sum(item.get("strength", 1) for item in cond)
    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond_ = None
    else:
        uncond_ = uncond

    for fn in model_options.get("sampler_pre_cfg_function", []):
        model, cond, uncond_, x, timestep, model_options = fn(model, cond, uncond_, x, timestep, model_options)

    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)

    if "sampler_cfg_function" in model_options:
        args = {
            "cond": x - cond_pred,
            "uncond": x - uncond_pred,
            "cond_scale": cond_scale,
            "timestep": timestep,
            "input": x,
            "sigma": timestep,
            "cond_denoised": cond_pred,
            "uncond_denoised": uncond_pred,
            "model": model,
            "model_options": model_options,
        }
        cfg_result = x - model_options["sampler_cfg_function"](args)
    elif not math.isclose(edit_strength, 1.0):
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale

    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {
            "denoised": cfg_result,
            "cond": cond,
            "uncond": uncond,
            "model": model,
            "uncond_denoised": uncond_pred,
            "cond_denoised": cond_pred,
            "sigma": timestep,
            "model_options": model_options,
            "input": x,
        }
        cfg_result = fn(args)

    if return_full:
        return cfg_result, cond_pred, uncond_pred
    return cfg_result
