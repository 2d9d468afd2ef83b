"""A single-file CLIP vision model (what IP-Adapter users keep in models/clip_vision) goes through Forge's own
clip vision loader: it recognises ViT-L/H/bigG by layer count and builds the model from its fixed config. Here that
config is shrunk (hidden size 32, 24 layers of ViT-L's count) so a tiny random file takes the real path."""

from __future__ import annotations

import pytest
import torch

from freefuse import refine
from freefuse.forge import refinement as forge_refinement


@pytest.fixture
def tiny_vit_l(harness, monkeypatch, tmp_path):
    from backend.patcher import clipvision
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = dict(clipvision.CLIP_VISION_VITL, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                  projection_dim=16)  # fmt: skip
    monkeypatch.setattr(clipvision, "CLIP_VISION_VITL", config)
    monkeypatch.setattr(clipvision.memory_management, "should_use_fp16", lambda *a, **k: False)  # a GPU machine
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    folder = tmp_path / "clip_vision"
    folder.mkdir()
    path = folder / "CLIP-ViT-L-14.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    forge_refinement._loaded.clear()
    yield str(path), model
    forge_refinement._loaded.clear()


def test_a_clip_file_loads_through_forges_loader_and_embeds_like_the_original(tiny_vit_l):
    path, original = tiny_vit_l
    assert forge_refinement.clip_candidates([str(tiny_vit_l[0]).rsplit("/", 1)[0]]) == [path]
    loaded = forge_refinement._load("clip", path, forge_refinement._load_clip)
    images = torch.rand(2, 3, 224, 224)
    ours = refine.embed(refine.clip_encoder(loaded, "CLIP-ViT-L-14"), images)
    expected = refine.embed(refine.clip_encoder(original.eval(), "original"), images)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    z = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(refine.embed(refine.clip_encoder(loaded, "x"), z).sum(), z)
    assert grad.abs().sum() > 0 and all(p.grad is None for p in loaded.parameters())


def test_a_file_forge_does_not_recognise_is_said(harness, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "clip-other.safetensors"
    save_file({"something.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a CLIP vision model Forge recognises"):
        forge_refinement._load_clip(str(path))
