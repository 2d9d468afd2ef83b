"""Build every tiny model of the webui tier into a Forge copy's models/ folders (run by forge_copy.py):

    cd <repo root> && FORGE_PYTHON -m tests.webui.build_models <forge copy>

Runs in Forge's own Python, with the copy's backend, packages_3rdparty and (patched) huggingface_guess
importable. Before writing, each single-file checkpoint is handed to the copy's huggingface_guess, so a
layout the patched guess does not recognise fails here, with the reason, instead of in the server.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _import_forge(forge: Path) -> None:
    for path in (forge / "repositories" / "huggingface_guess", forge / "packages_3rdparty", forge):
        sys.path.insert(0, str(path))
    sys.argv = [sys.argv[0], "--always-cpu"]  # backend/args.py parses sys.argv on import


def _save(path: Path, state: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    print(f"wrote {path.relative_to(path.parents[2])} ({len(state)} tensors)", flush=True)


def _check_guess(state: dict, repo: str, unet_config: dict) -> None:
    import huggingface_guess

    guess = huggingface_guess.guess(state)
    found = getattr(guess, "huggingface_repo", None)
    assert found == repo, f"huggingface_guess sees {found}, not {repo}"
    wrong = {k: (guess.unet_config.get(k), v) for k, v in unet_config.items() if guess.unet_config.get(k) != v}
    assert not wrong, f"huggingface_guess config differs (guessed, built): {wrong}"
    numpy = {k: type(v) for k, v in guess.unet_config.items() if type(v).__module__ == "numpy"}
    assert not numpy, f"huggingface_guess config holds numpy values (the model wants Python ints): {numpy}"


def _as_forge_loads(path: Path) -> dict:
    """A checkpoint file as backend/loader.py hands it to huggingface_guess."""
    from backend.loader import preprocess_state_dict
    from backend.utils import load_torch_file

    return preprocess_state_dict(load_torch_file(str(path)))


def main(forge: Path) -> None:
    import torch

    from tests.webui import sizes, tiny_checkpoints, tiny_gguf, tiny_loras  # before Forge's paths: no shadowing

    _import_forge(forge)

    models = forge / "models"
    for name in sizes.FLUX:
        state = tiny_checkpoints.flux_checkpoint(forge, name)
        expected = tiny_checkpoints.flux_transformer_config(name)
        _check_guess(state, "black-forest-labs/FLUX.1-dev", expected)
        _save(models / "Stable-diffusion" / f"{name}.safetensors", state)
    for name in sizes.SDXL:
        state = tiny_checkpoints.sdxl_checkpoint(forge, name)
        kwargs = tiny_checkpoints.sdxl_unet_kwargs(name)
        keys = ("model_channels", "transformer_depth", "transformer_depth_output", "context_dim", "adm_in_channels")
        _check_guess(state, "stabilityai/stable-diffusion-xl-base-1.0", {k: kwargs[k] for k in keys})
        _save(models / "Stable-diffusion" / f"{name}.safetensors", state)

    parts = tiny_checkpoints.flux_components(forge, "flux_a")  # the GGUF files are flux_a, split up
    for name, wanted in sizes.GGUF.items():
        path = models / "Stable-diffusion" / f"{name}.gguf"
        counts = tiny_gguf.write_gguf(path, parts["transformer"], wanted)
        flux_a = tiny_checkpoints.flux_transformer_config("flux_a")
        _check_guess(_as_forge_loads(path), "black-forest-labs/FLUX.1-dev", flux_a)
        print(f"wrote models/Stable-diffusion/{name}.gguf {counts}", flush=True)
    clip_file, t5_file = sizes.FLUX_TEXT_ENCODER_FILES
    for folder, file, part in (
        ("text_encoder", clip_file, "clip_l"),
        ("text_encoder", t5_file, "t5"),
        ("VAE", sizes.FLUX_VAE_FILE, "vae"),
    ):
        _save(models / folder / file, {k: v.to(torch.bfloat16) for k, v in parts[part].items()})  # as flux_a has them

    for name, state in tiny_loras.all_loras(forge).items():
        metadata = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(sizes.LORA_RANK),
            "ss_network_alpha": str(sizes.LORA_RANK / 2),
        }
        _save(models / "Lora" / f"{name}.safetensors", state, metadata)

    from tests.tiny.encoders import save_clip_folder, save_dino_folder  # latent refinement's models, as users keep them

    save_clip_folder(models / "clip_vision" / "tiny-clip")
    save_dino_folder(models / "dinov2-tiny")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
