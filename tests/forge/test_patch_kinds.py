"""Non-plain LoRA kinds as FreeFuse subjects on the tiny real FLUX: LoHa, LoKr and DoRA.

The state dicts are built by hand with the key names Forge's loader reads
(packages_3rdparty/comfyui_lora_collection/lora.py: ``.hada_w1_a/.hada_w1_b/.hada_w2_a/.hada_w2_b/.alpha``,
``.lokr_w1/.lokr_w2``, ``.dora_scale``) and added through the harness's ``add_loras`` (Forge's key map,
``load_lora``, ``add_patches``). LoHa and LoKr subjects run as dense runtime deltas (computed with Forge's
``merge_lora_to_weight``); a DoRA subject depends on the base weight, so it stays merged.
"""

from __future__ import annotations

import pytest
import torch

from freefuse.forge import session as sessions
from tests.forge.harness import LoraFile
from tests.forge_common.flux_behaviour import TOL, Runner, _settings

LOHA_RANK, LOHA_ALPHA = 4, 2.0
DORA_NOTE = "DoRA patches depend on the base weight"


# ---------------------------------------------------------------------- hand-built LoRA files
def _weight(dm, module: str) -> torch.Tensor:
    return dict(dm.named_parameters())[f"{module}.weight"].detach()


def _kohya(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def _loha(dm, name: str, modules: list[str], seed: int) -> LoraFile:
    """LoHa on whole FLUX Linears: delta = alpha/r * (w1_a @ w1_b) * (w2_a @ w2_b)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for module in modules:
        n_out, n_in = _weight(dm, module).shape
        key = _kohya(module)
        sd[f"{key}.hada_w1_a"] = 0.4 * torch.randn(n_out, LOHA_RANK, generator=gen)  # [out, r]
        sd[f"{key}.hada_w1_b"] = 0.4 * torch.randn(LOHA_RANK, n_in, generator=gen)  # [r, in]
        sd[f"{key}.hada_w2_a"] = 0.4 * torch.randn(n_out, LOHA_RANK, generator=gen)
        sd[f"{key}.hada_w2_b"] = 0.4 * torch.randn(LOHA_RANK, n_in, generator=gen)
        sd[f"{key}.alpha"] = torch.tensor(LOHA_ALPHA)
    return LoraFile(filename=f"{name}.safetensors", name=name, state_dict=sd)


def _lokr(name: str, targets: dict[str, tuple[int, int]], seed: int) -> LoraFile:
    """LoKr with full factors (no alpha scaling applies): delta = kron(w1 [4, 4], w2 [out/4, in/4])."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, (n_out, n_in) in targets.items():
        sd[f"{key}.lokr_w1"] = 0.3 * torch.randn(4, 4, generator=gen)
        sd[f"{key}.lokr_w2"] = 0.1 * torch.randn(n_out // 4, n_in // 4, generator=gen)
    return LoraFile(filename=f"{name}.safetensors", name=name, state_dict=sd)


def _with_dora(dm, lora: LoraFile, filename: str, seed: int) -> LoraFile:
    """The same plain kohya LoRA plus a ``dora_scale`` [out, 1] per layer (near the base rows' norms)."""
    gen = torch.Generator().manual_seed(seed)
    modules = {_kohya(name.removesuffix(".weight")): name for name, _ in dm.named_parameters()}
    sd = dict(lora.state_dict)
    for key in lora.state_dict:
        if key.endswith(".lora_down.weight"):
            prefix = key.removesuffix(".lora_down.weight")
            base = dict(dm.named_parameters())[modules[prefix]].detach()  # [out, in]
            noise = 1 + 0.2 * torch.randn(base.shape[0], 1, generator=gen)
            sd[f"{prefix}.dora_scale"] = base.norm(dim=1, keepdim=True) * noise
    return LoraFile(filename=filename, name=lora.name, state_dict=sd)


def _loha_delta(sd: dict, module: str) -> torch.Tensor:
    key = _kohya(module)
    w1 = sd[f"{key}.hada_w1_a"] @ sd[f"{key}.hada_w1_b"]
    w2 = sd[f"{key}.hada_w2_a"] @ sd[f"{key}.hada_w2_b"]
    return (LOHA_ALPHA / LOHA_RANK) * w1 * w2


def _lokr_delta(sd: dict, key: str) -> torch.Tensor:
    return torch.kron(sd[f"{key}.lokr_w1"], sd[f"{key}.lokr_w2"])


def _runtime_weight(layer, owner: int) -> torch.Tensor:
    """The dense delta weight one subject adds to this layer at runtime (all its dense terms summed)."""
    delta = layer.delta
    full = torch.zeros(delta.out_features, delta.in_features)
    for term_owner, start, stop, weight in delta.dense:
        if term_owner == owner:
            full[start:stop] += weight.float()
    return full


# ---------------------------------------------------------------------- fixtures
HIDDEN = 64
LOHA_MODULES = ["double_blocks.0.img_attn.qkv", "double_blocks.1.img_mlp.0", "double_blocks.2.txt_mlp.2"]
LOHA_IMAGE_ONLY = ["double_blocks.0.img_attn.qkv", "double_blocks.1.img_mlp.0", "double_blocks.2.img_attn.proj"]


def _lokr_targets(dm) -> dict[str, tuple[int, int]]:
    """kohya whole weights (image, joint) and one diffusers q/k/v name: rows h..2h of img_attn.qkv."""
    targets = {
        _kohya(m): tuple(_weight(dm, m).shape) for m in ("double_blocks.0.img_attn.proj", "single_blocks.0.linear1")
    }
    targets["transformer.transformer_blocks.1.attn.to_k"] = (HIDDEN, HIDDEN)
    return targets


@pytest.fixture
def flux(harness):
    unet = harness.make_flux_unet(seed=0, hidden=HIDDEN)
    return harness, unet, unet.model.diffusion_model


def _run_open(harness, unet, subjects, masks, seed):
    """Sample with FreeFuse and return (output, runtime, messages, the patched clone's identifiers)."""
    seen = {}
    runner = Runner(harness, _settings(), subjects, masks=masks, keep_open=True)

    def before(unet_, sigmas, x, cond, uncond):
        patched = runner.before_sampling(unet_, sigmas, x, cond, uncond)
        seen["idents"] = list(patched.lora_patches)
        return patched

    try:
        out = harness.sample(unet, seed=seed, before_sampling=before)
        session = sessions.active()
        assert session is runner.session and session.runtime is not None, runner.session.messages
        runtime, messages = session.runtime, list(session.messages)
    finally:
        runner.remove_spies()
        sessions.close_active()
    assert sessions.active() is None
    assert runner.calls and all(mode == "masked" for _, mode in runner.calls)
    return out, runtime, messages, seen["idents"]


# ---------------------------------------------------------------------- LoHa / LoKr
def test_loha_and_lokr_subjects_with_all_ones_masks_equal_the_merged_loras(flux):
    harness, unet, dm = flux
    a = _loha(dm, "A", LOHA_MODULES, seed=1)
    b = _lokr("B", _lokr_targets(dm), seed=2)
    merged = harness.add_loras(unet, [(a, 1.0), (b, 0.8)])
    kinds = {ident[0]: {e[1][0] for es in p.values() for e in es} for ident, p in merged.lora_patches.items()}
    assert kinds == {a.filename: {"loha"}, b.filename: {"lokr"}}  # Forge's loader read every key
    assert sum(len(p) for p in merged.lora_patches.values()) == len(LOHA_MODULES) + 3
    reference = harness.sample(merged, seed=3)
    assert not torch.allclose(reference, harness.sample(unet, seed=3), **TOL)

    out, runtime, messages, idents = _run_open(harness, merged, [a, b], ("ones", "ones"), seed=3)
    torch.testing.assert_close(out, reference, **TOL)
    assert runtime.left_merged == [] and idents == [], messages
    layers = {layer.module_path.removeprefix("diffusion_model."): layer for layer in runtime.layers}
    expected_layouts = {
        "double_blocks.0.img_attn.qkv": "image",
        "double_blocks.1.img_mlp.0": "image",
        "double_blocks.2.txt_mlp.2": "text",
        "double_blocks.0.img_attn.proj": "image",
        "single_blocks.0.linear1": "joint",
        "double_blocks.1.img_attn.qkv": "image",
    }
    assert {path: layer.layout for path, layer in layers.items()} == expected_layouts
    assert all(layer.delta.rank == 0 for layer in layers.values())  # dense terms only, no low-rank factors

    # The runtime deltas are the LoHa / LoKr products, strength folded in, computed here by hand.
    for module in LOHA_MODULES:
        torch.testing.assert_close(_runtime_weight(layers[module], 0), _loha_delta(a.state_dict, module), **TOL)
    for module in ("double_blocks.0.img_attn.proj", "single_blocks.0.linear1"):
        expected = 0.8 * _lokr_delta(b.state_dict, _kohya(module))
        torch.testing.assert_close(_runtime_weight(layers[module], 1), expected, **TOL)
    to_k = torch.zeros(3 * HIDDEN, HIDDEN)
    to_k[HIDDEN : 2 * HIDDEN] = 0.8 * _lokr_delta(b.state_dict, "transformer.transformer_blocks.1.attn.to_k")
    torch.testing.assert_close(_runtime_weight(layers["double_blocks.1.img_attn.qkv"], 1), to_k, **TOL)


def test_a_zero_mask_on_an_image_only_loha_equals_generating_without_it(flux):
    harness, unet, dm = flux
    a = _loha(dm, "A", LOHA_IMAGE_ONLY, seed=4)
    b = _lokr("B", _lokr_targets(dm), seed=5)
    without_a = harness.sample(harness.add_loras(unet, [(b, 0.8)]), seed=6)
    both = harness.add_loras(unet, [(a, 1.0), (b, 0.8)])
    assert not torch.allclose(harness.sample(both, seed=6), without_a, **TOL)

    out, runtime, _, _ = _run_open(harness, both, [a, b], ("zeros", "ones"), seed=6)
    torch.testing.assert_close(out, without_a, **TOL)
    assert runtime.left_merged == []


# ---------------------------------------------------------------------- DoRA
def test_a_dora_subject_stays_merged_and_all_ones_masks_equal_the_merged_generation(flux):
    harness, unet, dm = flux
    plain_a = harness.make_lora(unet, name="A", seed=7, targets="attn")
    a = _with_dora(dm, plain_a, "dora_A.safetensors", seed=8)
    b = harness.make_lora(unet, name="B", seed=9)
    n_dora = sum(k.endswith(".dora_scale") for k in a.state_dict)
    merged = harness.add_loras(unet, [(a, 1.0), (b, 1.0)])
    entries = list(merged.lora_patches[(a.filename, 1.0, 1.0, False)].values())
    assert len(entries) == n_dora and all(e[0][1][1][4] is not None for e in entries)  # dora_scale loaded
    reference = harness.sample(merged, seed=10)
    plain_reference = harness.sample(harness.add_loras(unet, [(plain_a, 1.0), (b, 1.0)]), seed=10)
    assert not torch.allclose(reference, plain_reference, **TOL)  # the dora_scale matters

    out, runtime, messages, idents = _run_open(harness, merged, [a, b], ("ones", "ones"), seed=10)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference, **TOL)
    assert len(runtime.left_merged) == n_dora
    assert all(note.startswith(f"{a.filename}: ") and DORA_NOTE in note for note in runtime.left_merged)
    assert idents == [(a.filename + "#freefuse-kept", 1.0, 1.0, False)]  # B's plain LoRA left the merge
    assert any(f"{n_dora} LoRA patches stay merged" in m for m in messages)
    owners = {int(o) for layer in runtime.layers for o in layer.delta.rank_owner}
    assert owners == {1} and all(not layer.delta.dense for layer in runtime.layers)  # only B runs at runtime


def _dora_case(harness, unet, dm, order):
    plain_a = harness.make_lora(unet, name="A", seed=7, targets="attn")
    dora_a = _with_dora(dm, plain_a, "dora_A.safetensors", seed=8)
    b = harness.make_lora(unet, name="B", seed=9)
    plain_c = harness.make_lora(unet, name="C", seed=11, targets="attn")
    dora_c = _with_dora(dm, plain_c, "dora_C.safetensors", seed=12)
    return {
        "B-then-dora-subject-A": ([b, dora_a], [dora_a, b]),
        "A-B-then-dora-non-subject-C": ([plain_a, b, dora_c], [plain_a, b]),
        "dora-subject-A-C-B": ([dora_a, plain_c, b], [dora_a, b]),
    }[order]


def test_a_kept_dora_lora_is_merged_at_its_own_place_in_the_merge_order(flux):
    """DoRA normalises by the weight it lands on, so the kept patches go back where the LoRA stood."""
    harness, unet, dm = flux
    loras, subjects = _dora_case(harness, unet, dm, "dora-subject-A-C-B")
    merged = harness.add_loras(unet, [(lora, 1.0) for lora in loras])  # in prompt order
    reference = harness.sample(merged, seed=10)
    out, _, messages, idents = _run_open(harness, merged, subjects, ("ones", "ones"), seed=10)
    torch.testing.assert_close(out, reference, **TOL)
    assert [ident[0] for ident in idents] == ["dora_A.safetensors#freefuse-kept", loras[1].filename]


@pytest.mark.parametrize("order", ["B-then-dora-subject-A", "A-B-then-dora-non-subject-C"])
def test_a_dora_lora_merged_on_other_subjects_weights_is_reported(flux, order):
    """Inherent: with plain subject LoRAs taken out of the merge, a DoRA LoRA merged after them normalises
    by weights without them (Forge: dora(W + dB); FreeFuse: dora(W) + dB at runtime). The user is told."""
    harness, unet, dm = flux
    loras, subjects = _dora_case(harness, unet, dm, order)
    merged = harness.add_loras(unet, [(lora, 1.0) for lora in loras])
    reference = harness.sample(merged, seed=10)
    out, _, messages, _ = _run_open(harness, merged, subjects, ("ones", "ones"), seed=10)
    assert torch.isfinite(out).all()
    assert any("DoRA LoRA" in m and "can differ slightly" in m for m in messages), messages
    assert (out - reference).abs().max() < 0.5 * (reference - harness.sample(unet, seed=10)).abs().max()
