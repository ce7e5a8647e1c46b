"""Where PAPO's mask is drawn: before the pixel-budget resize (reference) or after it."""

import numpy as np
import pytest
from PIL import Image

from vispo.algos import ObjectiveConfig
from vispo.train.batch import masked_variant, prepare_image

# factor 28, min 28 x 28, max 56 x 56 pixels: a 112 x 112 image is 2x over the budget.
BUDGET = (28, 28 * 28, 56 * 56)


def _white(side):
    return Image.fromarray(np.full((side, side, 3), 255, dtype=np.uint8))


def _block_centres(image, block):
    arr = np.asarray(image)[..., 0].astype(int)
    n = arr.shape[0] // block
    return np.array(
        [[arr[block * i + block // 2, block * j + block // 2] for j in range(n)] for i in range(n)]
    )


def test_reference_order_gives_14_pixel_patches_in_the_original_image():
    original = _white(112)
    clean = prepare_image(original, BUDGET)
    assert clean.size == (56, 56)
    got = masked_variant(
        clean, original, budget=BUDGET, patch_size=14, ratio=0.5, rng=np.random.default_rng(3)
    )
    assert got.size == clean.size
    # The blocks drawn on the 112 x 112 image (8 x 8 grid of 14 px, Bernoulli per block) are
    # 7 x 7 pixels once resized to 56 x 56: their centres are black or white accordingly.
    blocks = np.random.default_rng(3).random((8, 8)) < 0.5
    assert 10 < blocks.sum() < 54
    centres = _block_centres(got, 7)
    assert (centres[blocks] < 20).all() and (centres[~blocks] > 235).all()


def test_after_resize_order_gives_14_pixel_patches_at_the_model_resolution():
    original = _white(112)
    clean = prepare_image(original, BUDGET)
    got = masked_variant(
        clean, None, budget=BUDGET, patch_size=14, ratio=0.5, rng=np.random.default_rng(3)
    )
    blocks = np.random.default_rng(3).random((4, 4)) < 0.5
    assert 0 < blocks.sum() < 16
    arr = np.asarray(got)[..., 0]
    for i in range(4):
        for j in range(4):
            patch = arr[14 * i : 14 * i + 14, 14 * j : 14 * j + 14]
            assert (patch == (0 if blocks[i, j] else 255)).all()


def test_without_a_budget_both_orders_mask_the_same_image():
    original = _white(42)
    a = masked_variant(
        original, original, budget=None, patch_size=14, ratio=0.5, rng=np.random.default_rng(1)
    )
    b = masked_variant(
        original, None, budget=None, patch_size=14, ratio=0.5, rng=np.random.default_rng(1)
    )
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_mask_order_is_a_validated_config_field_defaulting_to_the_reference():
    assert ObjectiveConfig().mask_order == "before-resize"
    with pytest.raises(ValueError, match="mask_order"):
        ObjectiveConfig(mask_order="later")


def test_a_budget_mismatch_is_an_error():
    original = _white(112)
    with pytest.raises(ValueError, match="budget"):
        masked_variant(
            _white(56),
            original,
            budget=None,
            patch_size=14,
            ratio=0.5,
            rng=np.random.default_rng(0),
        )
