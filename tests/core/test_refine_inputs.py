"""Reference images for latent refinement: every form a user sends, and one sentence per unusable one."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from freefuse.refine_inputs import read_references, subject_of, to_tensor

LORAS = ["harry", "harry_old", "daiyu"]


def _png(colour=(255, 0, 0), size=(6, 4), mode="RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _file(tmp_path, name, colour=(0, 255, 0)):
    path = tmp_path / name
    Image.new("RGB", (5, 5), colour).save(path)
    return str(path)


def test_file_names_go_to_the_longest_lora_name_they_start_with():
    assert subject_of("harry.png", LORAS) == "harry"
    assert subject_of("/tmp/x/Harry-2.JPG", LORAS) == "harry"
    assert subject_of("harry_old 1.webp", LORAS) == "harry_old"
    assert subject_of("harry3.png", LORAS) == "harry"
    assert subject_of("harrypotter.png", LORAS) is None  # a longer word is another name
    assert subject_of("portrait.png", LORAS) is None


def test_api_form_style_image_and_subjects_by_lora_name():
    refs = read_references(
        _png(), {"harry": [_png((0, 0, 255)), "data:image/png;base64," + _png()], "daiyu": _png()}, LORAS
    )
    assert refs.messages == []
    assert len(refs.style) == 1 and refs.style[0].shape == (4, 6, 3)
    assert [len(refs.subjects[n]) for n in LORAS] == [2, 0, 1]
    assert tuple(refs.style[0][0, 0]) == (255, 0, 0)


def test_rgba_and_grey_images_become_rgb():
    refs = read_references([_png((1, 2, 3, 255), mode="RGBA"), _png(7, mode="L")], None, LORAS)
    assert [im.shape for im in refs.style] == [(4, 6, 3), (4, 6, 3)]
    assert tuple(refs.style[1][0, 0]) == (7, 7, 7)


def test_web_ui_files_are_matched_by_name(tmp_path):
    files = [_file(tmp_path, "harry-1.png"), _file(tmp_path, "daiyu.png"), _file(tmp_path, "cat.png")]
    refs = read_references(None, files, LORAS, allow_paths=True)
    assert [len(refs.subjects[n]) for n in LORAS] == [1, 0, 1]
    assert refs.messages == [
        "subject reference 'cat.png' matches no subject LoRA (harry, harry_old, daiyu); name the file after its "
        "LoRA, e.g. harry-1.png"
    ]


def test_gradio_file_dicts_keep_their_original_names(tmp_path):
    path = _file(tmp_path, "tmpab12cd.png")
    refs = read_references(None, [{"path": path, "orig_name": "daiyu-3.png"}], LORAS, allow_paths=True)
    assert len(refs.subjects["daiyu"]) == 1 and refs.messages == []


def test_bad_inputs_get_one_sentence_each_and_the_rest_is_used():
    refs = read_references(["not an image", _png()], {"harr": _png(), "daiyu": [_png(), "%%%"]}, LORAS)
    assert len(refs.style) == 1 and len(refs.subjects["daiyu"]) == 1
    assert refs.messages == [
        "style_reference is not an image (not a base64-encoded PNG or JPEG); it is not used",
        "subject_references names 'harr', which is not a subject LoRA of this prompt (harry, harry_old, daiyu); "
        "its images are not used",
        "a subject reference of daiyu is not an image (not a base64-encoded PNG or JPEG); it is not used",
    ]


def test_api_paths_are_data_not_files(tmp_path):
    path = _file(tmp_path, "harry.png")
    refs = read_references(path, [_png()], LORAS, allow_paths=False)
    assert refs.empty
    assert refs.messages[0].startswith("style_reference is not an image")
    assert refs.messages[1].startswith("subject_references must name each image's subject")


def test_nothing_given_is_empty_and_silent():
    refs = read_references(None, None, LORAS)
    assert refs.empty and refs.messages == []
    assert read_references("", [], LORAS).empty


def test_to_tensor_is_channels_first_in_unit_range():
    t = to_tensor(np.full((2, 3, 3), 255, dtype=np.uint8))
    assert t.shape == (3, 2, 3) and t.dtype.is_floating_point and float(t.max()) == 1.0
