"""Images in, images out: loading, resizing to the processor's budget, and perturbations.

Everything here works on PIL images / NumPy arrays before the processor (never on a
model's flattened ``pixel_values``), is pure, keeps the image size, and takes its
randomness from a passed ``numpy.random.Generator``. No torchvision.

* ``load_image``: any dataset image -> RGB PIL image, or ``ImageLoadError`` naming the sample.
* ``smart_resize`` / ``resize_to_budget``: the Qwen-VL pixel-budget rule, applied once.
* ``random_patch_mask`` and ``MASK_STRATEGIES``: PAPO's masked image (algorithms.md 6.1).
* ``info_preserving`` / ``info_removing``: CPPO's I+ and I- (algorithms.md 7.1).
* ``gaussian_noise``: NoisyRollout-style noise.
* ``PERTURBATIONS`` / ``apply_to_images``: names for configs, multi-image prompts.
"""

from vispo.vision.loading import DEFAULT_MAX_IMAGE_PIXELS, ImageLoadError, load_image
from vispo.vision.masks import (
    MASK_STRATEGIES,
    apply_block_mask,
    block_gradient_energy,
    draw_block_mask,
    get_mask_strategy,
    patch_grid_shape,
    random_patch_mask,
    saliency_patch_mask,
)
from vispo.vision.perturb import (
    INFO_PRESERVING_OPS,
    INFO_REMOVING_OPS,
    PERTURBATIONS,
    adjust_color,
    apply_to_images,
    color_jitter,
    gaussian_blur,
    gaussian_noise,
    get_perturbation,
    info_preserving,
    info_removing,
    perspective,
    perspective_coefficients,
    random_occlusion,
    random_perspective,
    random_rotation,
    rotate,
    zoom_crop,
)
from vispo.vision.resize import resize_to_budget, smart_resize

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "INFO_PRESERVING_OPS",
    "INFO_REMOVING_OPS",
    "MASK_STRATEGIES",
    "PERTURBATIONS",
    "ImageLoadError",
    "adjust_color",
    "apply_block_mask",
    "apply_to_images",
    "block_gradient_energy",
    "color_jitter",
    "draw_block_mask",
    "gaussian_blur",
    "gaussian_noise",
    "get_mask_strategy",
    "get_perturbation",
    "info_preserving",
    "info_removing",
    "load_image",
    "patch_grid_shape",
    "perspective",
    "perspective_coefficients",
    "random_occlusion",
    "random_patch_mask",
    "random_perspective",
    "random_rotation",
    "resize_to_budget",
    "rotate",
    "saliency_patch_mask",
    "smart_resize",
    "zoom_crop",
]
