"""Image-only processors for the Qwen-VL family, and vispo's own processor loader.

Why: the Qwen2-VL, Qwen2.5-VL and Qwen3-VL processors take a video processor, and every video
processor needs torchvision, which vispo never installs (see design.md, "Known pitfalls").
Passing ``video_processor=None`` to the stock classes fails. The subclasses below declare no
video processor in their constructor (transformers derives a processor's sub-processors from
its ``__init__`` signature), so they build, save and load with the PIL image processors.

``AutoProcessor.from_pretrained`` cannot resolve these class names (they are not registered
in transformers), and on a folder it then silently returns only the tokenizer. vispo's
:func:`load_processor` reads the processor class recorded in the folder (or the model type)
and rebuilds the right processor.

A folder written by ``vispo export`` must load with plain ``AutoProcessor`` and no vispo import,
also without torchvision. Every transformers video processor needs torchvision, so no folder that
names ``Qwen2VLProcessor`` (or its 2.5/3 siblings) can load there. :func:`save_portable_processor`
therefore records transformers' own ``PaddleOCRVLProcessor``: an image-only processor (tokenizer +
image processor, no video processor) that expands each image placeholder into
``grid_t * grid_h * grid_w / merge_size**2`` copies exactly as the Qwen-VL processors do, and
returns the same keys (``input_ids``, ``attention_mask``, ``mm_token_type_ids``,
``pixel_values``, ``image_grid_thw``). The image processor stays the Qwen-VL one (its PIL backend
without torchvision). tests/test_export_hf.py checks that its tensors equal the image-only twin's.
"""

from __future__ import annotations

import json
import os
from typing import Any

import transformers
from transformers import (
    AutoConfig,
    AutoProcessor,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
    Qwen3VLProcessor,
)
from transformers.processing_utils import ProcessorMixin


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without a video processor (works without torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without a video processor (works without torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen3VLImageOnlyProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without a video processor (works without torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


# vispo's processor classes by the name recorded in a saved folder.
VISPO_PROCESSORS: dict[str, type[ProcessorMixin]] = {
    cls.__name__: cls
    for cls in (Qwen2VLImageOnlyProcessor, Qwen2_5_VLImageOnlyProcessor, Qwen3VLImageOnlyProcessor)
}
# Stock processor classes that need torchvision for their video processor -> image-only twin.
IMAGE_ONLY_REPLACEMENTS: dict[str, type[ProcessorMixin]] = {
    "Qwen2VLProcessor": Qwen2VLImageOnlyProcessor,
    "Qwen2_5_VLProcessor": Qwen2_5_VLImageOnlyProcessor,
    "Qwen3VLProcessor": Qwen3VLImageOnlyProcessor,
}
# The same, keyed by the model type in config.json (used when no processor class is recorded).
IMAGE_ONLY_BY_MODEL_TYPE: dict[str, type[ProcessorMixin]] = {
    "qwen2_vl": Qwen2VLImageOnlyProcessor,
    "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor,
    "qwen3_vl": Qwen3VLImageOnlyProcessor,
}

_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")

#: The stock transformers class that an exported Qwen-VL folder names (module docstring).
PORTABLE_QWEN_PROCESSOR = "PaddleOCRVLProcessor"


def _model_type(path: str) -> str | None:
    """``model_type`` of a local folder's ``config.json``, if any."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError):
        return None


def _recorded_processor_class(path: str) -> str | None:
    """The ``processor_class`` recorded in a local processor folder, if any."""
    for name in _PROCESSOR_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                recorded = json.load(f).get("processor_class")
            if recorded:
                return recorded
    return None


def processor_class_for(name_or_path: str, *, trust_remote_code: bool = False) -> type | None:
    """Which processor class vispo uses for a checkpoint (``None``: defer to AutoProcessor)."""
    recorded = _recorded_processor_class(name_or_path) if os.path.isdir(name_or_path) else None
    if recorded == PORTABLE_QWEN_PROCESSOR:  # a folder written by vispo export
        twin = IMAGE_ONLY_BY_MODEL_TYPE.get(_model_type(name_or_path))
        if twin is not None:
            return twin
    if recorded is not None:
        if recorded in VISPO_PROCESSORS:
            return VISPO_PROCESSORS[recorded]
        if recorded in IMAGE_ONLY_REPLACEMENTS:
            return IMAGE_ONLY_REPLACEMENTS[recorded]
        stock = getattr(transformers, recorded, None)
        if isinstance(stock, type) and issubclass(stock, ProcessorMixin):
            return stock
        return None
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    return IMAGE_ONLY_BY_MODEL_TYPE.get(getattr(config, "model_type", None))


def load_processor(
    name_or_path: str | os.PathLike, *, trust_remote_code: bool = False, **kwargs: Any
) -> ProcessorMixin:
    """Load the multimodal processor of a checkpoint (folder or hub id in the local cache).

    Qwen-VL processors are rebuilt as their image-only twins (no torchvision needed); other
    architectures go through their own processor class or ``AutoProcessor``. Raises
    ``ValueError`` if what loads is not a multimodal processor (e.g. only a tokenizer, which is
    what ``AutoProcessor`` returns when it cannot resolve the recorded class).
    """
    path = os.fspath(name_or_path)
    cls = processor_class_for(path, trust_remote_code=trust_remote_code)
    if cls is not None:
        processor = cls.from_pretrained(path, **kwargs)
    else:
        processor = AutoProcessor.from_pretrained(
            path, trust_remote_code=trust_remote_code, **kwargs
        )
    if not isinstance(processor, ProcessorMixin) or not hasattr(processor, "image_processor"):
        raise ValueError(
            f"{path!r} did not load as a multimodal processor (got {type(processor).__name__}); "
            "is it a vision-language checkpoint with a processor/preprocessor config?"
        )
    return processor


def _rewrite_json(path: str, update) -> None:
    with open(path, encoding="utf-8") as f:
        tree = json.load(f)
    update(tree)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tree, f, indent=2, sort_keys=True)
        f.write("\n")


def save_portable_processor(processor: ProcessorMixin, out_dir: str | os.PathLike) -> str:
    """Save ``processor`` so that plain ``AutoProcessor.from_pretrained(out_dir)`` rebuilds it.

    Works without torchvision and without importing vispo (module docstring). For vispo's
    image-only Qwen-VL processors the folder names transformers' ``PaddleOCRVLProcessor`` and
    the tokenizer records its image token (``image_token`` in ``tokenizer_config.json``); other processors (e.g.
    Idefics3/SmolVLM) are saved as they are. Returns the processor class name recorded.
    """
    out = os.fspath(out_dir)
    processor.save_pretrained(out)
    if type(processor).__name__ not in VISPO_PROCESSORS:
        return type(processor).__name__
    image_token = processor.image_token

    def processor_config(tree: dict) -> None:
        tree["processor_class"] = PORTABLE_QWEN_PROCESSOR

    def tokenizer_config(tree: dict) -> None:
        tree["processor_class"] = PORTABLE_QWEN_PROCESSOR
        # A top-level ``*_token`` key becomes a named special token (``tokenizer.image_token``,
        # ``tokenizer.image_token_id``), which PaddleOCRVLProcessor reads.
        tree["image_token"] = image_token

    _rewrite_json(os.path.join(out, "processor_config.json"), processor_config)
    _rewrite_json(os.path.join(out, "tokenizer_config.json"), tokenizer_config)
    return PORTABLE_QWEN_PROCESSOR
