"""Per-token weights of the subject LoRAs for one model call (CFG chunks, batch, text repetition)."""

import pytest
import torch

from freefuse.call_weights import FULL, MASKED, OFF, CallShape, exclusion_pattern, image_weights, text_weights

# two images of a 2x2 grid, two subjects: image 0 = left|right, image 1 = top|bottom
MASKS = torch.tensor(
    [
        [[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]],
        [[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]],
    ]
)


def test_masked_image_weights_repeat_each_image_mask_per_cfg_chunk():
    shape = CallShape(cond_or_uncond=(1, 0), images=2, n_img=4, n_txt=6)
    w = image_weights(shape, MASKS, 2, MASKED)
    assert w.shape == (4, 4, 2)
    assert w[0, :, 0].tolist() == [1, 0, 1, 0]  # uncond image 0, subject 0
    assert w[3, :, 1].tolist() == [0, 0, 1, 1]  # cond image 1, subject 1
    assert torch.equal(w[:2], w[2:])  # uncond rows get the same spatial masks as cond rows


def test_off_and_full_modes_ignore_masks():
    shape = CallShape(cond_or_uncond=(0,), images=1, n_img=4, n_txt=3)
    assert image_weights(shape, None, 2, OFF).abs().sum() == 0
    assert bool((image_weights(shape, None, 2, FULL) == 1).all())
    assert text_weights(shape, None, 2, OFF).abs().sum() == 0


def test_mask_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="masks give"):
        image_weights(CallShape((0,), 1, 9, 3), MASKS[:1], 2, MASKED)


def test_exclusion_zeroes_each_lora_at_the_other_subjects_tokens():
    pattern = exclusion_pattern([[1, 2], [4]], n_txt_cond=6)
    assert pattern[:, 0].tolist() == [1, 1, 1, 1, 0, 1]
    assert pattern[:, 1].tolist() == [1, 0, 0, 1, 1, 1]


def test_exclusion_applies_to_cond_chunks_only_and_repeats_with_the_text():
    pattern = exclusion_pattern([[1], [2]], n_txt_cond=3)
    shape = CallShape(cond_or_uncond=(1, 0), images=1, n_img=4, n_txt=6)  # cond repeated 3 -> 6 tokens
    w = text_weights(shape, pattern, 2, MASKED)
    assert bool((w[0] == 1).all())  # uncond row: its tokens are another prompt
    assert w[1, :, 0].tolist() == [1, 1, 0, 1, 1, 0]
    assert w[1, :, 1].tolist() == [1, 0, 1, 1, 0, 1]
