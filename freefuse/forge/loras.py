"""Subject LoRAs out of Forge's weight merge, and back in as masked runtime deltas.

Forge keeps one entry per LoRA in ``unet.lora_patches``:
``(filename, strength, strength_model, online) -> {param_key: [[strength, v, strength_model, offset, fn], ...]}``
and merges whatever identifiers the patcher holds when the model loads. Popping a subject LoRA's identifier
from a clone makes Forge restore the original weights and merge only the other LoRAs; nothing here writes a
parameter or mutates the shared inner patch dicts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from freefuse.adapters import DenseDelta, LowRankFactor, MaskedDelta
from freefuse.conv_adapters import ConvLowRankFactor, MaskedConvDelta

PatchEntry = list  # [strength, v, strength_model, offset, function]
KEPT_SUFFIX = "#freefuse-kept"
DENSE_BUDGET_BYTES = 1 << 30  # dense (LoHa/LoKr/diff) runtime deltas beyond this stay merged instead


@dataclass
class LayerAdapters:
    """Runtime deltas of one model layer."""

    module_path: str  # relative to the KModel, e.g. "diffusion_model.double_blocks.3.img_attn.qkv"
    layout: str  # "image" | "text" | "joint" | "global" | "conv" (a Conv2d: weights per output pixel)
    delta: MaskedDelta | MaskedConvDelta


@dataclass
class RuntimeLoras:
    layers: list[LayerAdapters] = field(default_factory=list)
    left_merged: list[str] = field(default_factory=list)  # human-readable notes on patches kept in the merge
    nbytes: int = 0


def identifiers_by_file(lora_patches: dict) -> dict[str, list[tuple]]:
    """Forge identifiers grouped by LoRA filename (one file may have been added with several strengths)."""
    out: dict[str, list[tuple]] = {}
    for ident in lora_patches:
        out.setdefault(ident[0], []).append(ident)
    return out


def take_out(unet, filenames: list[str]) -> dict[str, list[tuple[tuple, dict]]]:
    """Pop every identifier of the given LoRA files from ``unet`` (a clone); return them per file."""
    by_file = identifiers_by_file(unet.lora_patches)
    taken: dict[str, list[tuple[tuple, dict]]] = {}
    for filename in filenames:
        for ident in by_file.get(filename, []):
            taken.setdefault(filename, []).append((ident, unet.lora_patches.pop(ident)))
    return taken


def put_back_kept(unet, original_order: list[tuple], keep: dict[tuple, dict]) -> None:
    """Re-add the patches that stay merged where their LoRA stood: merge order matters for DoRA."""
    current = dict(unet.lora_patches)
    unet.lora_patches.clear()
    for ident in original_order:
        if ident in current:
            unet.lora_patches[ident] = current[ident]
        kept = (ident[0] + KEPT_SUFFIX, *ident[1:])
        if kept in keep:
            unet.lora_patches[kept] = keep[kept]


def dora_merged_after_subjects(lora_patches: dict, original_order: list[tuple], subjects: list[str]) -> list[str]:
    """Merged DoRA LoRAs that Forge would have merged on top of a subject LoRA FreeFuse now runs at runtime.

    DoRA normalises by the weight it lands on, so their effect can differ slightly from a plain merge.
    """
    first_subject = min((i for i, ident in enumerate(original_order) if ident[0] in subjects), default=None)
    if first_subject is None:
        return []
    later = {ident[0] for ident in original_order[first_subject + 1 :]}
    found = []
    for ident, patches in lora_patches.items():
        name = ident[0].removesuffix(KEPT_SUFFIX)
        if name in later and any(_is_dora(e[1]) for entries in patches.values() for e in entries):
            found.append(name)
    return found


def _is_dora(v) -> bool:
    return isinstance(v, tuple) and len(v) == 2 and v[0] in ("lora", "loha", "lokr") and v[1][-1] is not None


def _runtime_factor(entry: PatchEntry, owner: int) -> LowRankFactor | ConvLowRankFactor | None:
    """A plain LoRA patch as a low-rank factor (Linear or LoCon conv); None when it needs the dense path."""
    strength, v, strength_model, offset, function = entry
    if strength_model != 1.0 or function is not None or not (isinstance(v, tuple) and len(v) == 2):
        return None
    kind, payload = v
    if kind != "lora":
        return None
    up, down, alpha, mid, dora_scale = payload
    if mid is not None or dora_scale is not None:
        return None
    rank = down.shape[0]
    scale = float(strength) * (float(alpha) / rank if alpha is not None else 1.0)
    if down.ndim == 4 and up.ndim in (2, 4) and offset is None:
        return ConvLowRankFactor(down=down, up=up, scale=scale, owner=owner)
    if up.ndim != 2 or down.ndim != 2 or (offset is not None and offset[0] != 0):
        return None
    out_slice = (int(offset[1]), int(offset[2])) if offset is not None else None
    return LowRankFactor(down=down, up=up, scale=scale, owner=owner, out_slice=out_slice)


def _dense_delta(entry: PatchEntry, owner: int, weight_shape: torch.Size, merge: Callable | None) -> DenseDelta | str:
    """LoHa/LoKr/diff/adaLN-swapped patches as a dense delta via Forge's own merge maths; a reason if not."""
    v = entry[1]
    kind = v[0] if isinstance(v, tuple) and len(v) == 2 else "diff"
    if kind in ("glora", "set"):
        return f"{kind} patches depend on the base weight"
    if _is_dora(v):
        return "DoRA patches depend on the base weight"
    if merge is None or len(weight_shape) != 2:
        return f"{kind} patch on a {len(weight_shape)}-D weight"
    zero = torch.zeros(tuple(weight_shape), dtype=torch.float32)
    delta = merge([entry], zero, "freefuse")
    return DenseDelta(weight=delta, owner=owner)


def build_runtime_loras(
    model,
    taken: dict[str, list[tuple[tuple, dict]]],
    owners: dict[str, int],
    layout_of: Callable[[str], str | None],
    merge: Callable | None = None,
) -> tuple[RuntimeLoras, dict[tuple, dict]]:
    """One MaskedDelta per target layer, for every taken LoRA.

    ``model`` is the KModel (``unet.model``); ``owners`` maps filename -> subject index; ``layout_of`` maps a
    module path like "double_blocks.0.img_attn.qkv" to its token layout or None when it cannot be masked;
    ``merge`` is Forge's ``merge_lora_to_weight`` (for the dense path). Returns the runtime deltas and the
    patches that must stay merged (re-added under new identifiers by the caller).

    Every layer's delta is built and tried on a one-token input here, with the layer's logical shape: a layer
    whose deltas cannot run (mismatched LoCon kernels, a shape the layer does not have) stays merged as Forge
    runs it, with the reason, instead of failing inside sampling.
    """
    per_module: dict[str, list[tuple[object, tuple, str, PatchEntry]]] = {}  # path -> (routed, ident, key, entry)
    keep: dict[tuple, dict] = {}
    result = RuntimeLoras()
    dense_bytes = 0

    def stay_merged(ident: tuple, param_key: str, entry: PatchEntry) -> None:
        kept_ident = (ident[0] + KEPT_SUFFIX, *ident[1:])
        keep.setdefault(kept_ident, {}).setdefault(param_key, []).append(entry)

    for filename, idents in taken.items():
        for ident, patches in idents:
            for param_key, entries in patches.items():
                module_path, _, param = param_key.rpartition(".")
                inner = module_path.removeprefix("diffusion_model.")
                layout = layout_of(inner) if param == "weight" else None
                target = resolve_module(model, module_path)
                for entry in entries:
                    routed = _route(entry, owners[filename], layout, target, merge, dense_bytes)
                    if isinstance(routed, str):  # stays merged, under a new identifier, with the reason
                        stay_merged(ident, param_key, entry)
                        result.left_merged.append(f"{filename}: {inner}.{param} ({routed})")
                        continue
                    per_module.setdefault(module_path, []).append((routed, ident, param_key, entry))
                    if isinstance(routed, DenseDelta):
                        dense_bytes += routed.weight.numel() * 4
    for module_path, routed_entries in per_module.items():
        target = resolve_module(model, module_path)
        layout = layout_of(module_path.removeprefix("diffusion_model."))
        terms = [routed for routed, *_ in routed_entries]
        try:
            delta = _layer_delta(target, layout, terms)
            _try_layer(delta, target, layout)
        except (ValueError, RuntimeError, TypeError) as err:
            for _, ident, param_key, entry in routed_entries:
                stay_merged(ident, param_key, entry)
            result.left_merged.append(f"{module_path.removeprefix('diffusion_model.')} ({err})")
            continue
        result.layers.append(LayerAdapters(module_path, layout, delta))
        result.nbytes += sum(t.down.numel() + t.up.numel() for t in terms if not isinstance(t, DenseDelta)) * 4
        result.nbytes += sum(t.weight.numel() for t in terms if isinstance(t, DenseDelta)) * 4
    return result, keep


def _layer_delta(target, layout: str, terms: list) -> MaskedDelta | MaskedConvDelta:
    """The fused runtime delta of one layer from its low-rank factors and dense deltas (ValueError if they
    cannot be fused, e.g. subject LoCon factors with different kernels)."""
    if layout == "conv":
        return MaskedConvDelta(terms, stride=target.stride, padding=target.padding, dilation=target.dilation)
    factors = [t for t in terms if not isinstance(t, DenseDelta)]
    dense = [t for t in terms if isinstance(t, DenseDelta)]
    return MaskedDelta(_weight_shape(target)[0], factors, dense)


def _try_layer(delta, target, layout: str) -> None:
    """Check the delta on the layer's logical shape once, at install; ValueError when it cannot run there."""
    with torch.no_grad():
        if layout == "conv":
            delta.check_fits(
                int(target.in_channels), int(target.out_channels), target.kernel_size, target.stride,
                target.padding, target.dilation,
            )  # fmt: skip
        else:
            delta.check_fits(*_weight_shape(target))


def resolve_module(root, module_path: str):
    """The submodule at a dotted path ("diffusion_model.output_blocks.0.1"), or None when there is none."""
    obj = root
    for name in module_path.split("."):
        obj = getattr(obj, name, None)  # nn.Sequential / ModuleList children answer to "0", "1", ...
        if obj is None:
            return None
    return obj


def _route(entry: PatchEntry, owner: int, layout: str | None, target, merge, dense_bytes: int):
    """How one patch entry runs: a low-rank factor, a dense delta, or (a str) why it stays merged."""
    if layout is None or target is None:
        return "a layer FreeFuse does not mask"
    factor = _runtime_factor(entry, owner)
    if factor is not None:
        if not _fits(factor, target):
            return "its input width differs from the layer's"
        if (layout == "conv") == isinstance(factor, ConvLowRankFactor):
            return factor
    if layout == "conv":
        return "this conv patch kind is not applied at runtime"
    if dense_bytes > DENSE_BUDGET_BYTES:
        return "dense runtime deltas would exceed 1 GiB"
    return _dense_delta(entry, owner, _weight_shape(target), merge)


def _weight_shape(module) -> torch.Size:
    """The layer's logical weight shape, also for quantised weights (bnb nf4 packs its data)."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return torch.Size()
    out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
    if out_f is not None and in_f is not None:
        return torch.Size((int(out_f), int(in_f)))
    quant_state = getattr(weight, "quant_state", None)  # bitsandbytes 4-bit
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return torch.Size(int(n) for n in quant_state.shape)
    # GGUF parameters report their real shape, in numpy integers (numpy turns uint64 + int into a float)
    return torch.Size(int(n) for n in weight.shape)


def _fits(factor, target) -> bool:
    """The LoRA reads as many input features (channels) as the layer gets."""
    if isinstance(factor, ConvLowRankFactor):
        return factor.down.shape[1] == getattr(target, "in_channels", factor.down.shape[1])
    shape = _weight_shape(target)
    return len(shape) == 2 and factor.down.shape[1] == shape[1]
