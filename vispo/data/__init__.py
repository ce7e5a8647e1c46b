"""Data: samples, loaders, prompt templates, the image-token budget, built-in data sets, order.

* :class:`Sample` / :class:`SampleDataset`: (images, question, answer, meta), images decoded lazily.
* :func:`load_samples`: local HF dataset folders, parquet, JSON/JSONL + image folder,
  ``hub:org/name``; ViRL39K/PAPO, Geometry3K and ShareGPT (PAPO eval) schemas out of the box.
* :class:`PromptTemplate`, :data:`TEMPLATES`: Jinja prompts -> chat messages with image items.
* :func:`prompt_lengths`, :func:`filter_by_prompt_length`: the budget, image tokens included.
* :func:`easy_vqa`, :func:`synthetic_vqa`, :data:`BUILTIN_DATASETS`: no-download data.
* :class:`PromptSampler`: seeded per-epoch shuffling that resumes exactly from a checkpoint.
"""

from vispo.data.budget import filter_by_prompt_length, prompt_lengths
from vispo.data.builtin import (
    BUILTIN_DATASETS,
    easy_vqa,
    load_builtin,
    text_prior,
    text_prior_accuracy,
)
from vispo.data.loading import DEFAULT_COLUMNS, load_samples
from vispo.data.sample import DataError, Sample, SampleDataset
from vispo.data.sampler import PromptSampler
from vispo.data.synthetic import SYNTHETIC_TASKS, synthetic_vqa
from vispo.data.templates import (
    DEFAULT_TEMPLATE,
    REASONING_INSTRUCTION,
    TEMPLATES,
    PromptTemplate,
    get_template,
)

__all__ = [
    "BUILTIN_DATASETS",
    "DEFAULT_COLUMNS",
    "DEFAULT_TEMPLATE",
    "REASONING_INSTRUCTION",
    "SYNTHETIC_TASKS",
    "TEMPLATES",
    "DataError",
    "PromptSampler",
    "PromptTemplate",
    "Sample",
    "SampleDataset",
    "easy_vqa",
    "filter_by_prompt_length",
    "get_template",
    "load_builtin",
    "load_samples",
    "prompt_lengths",
    "synthetic_vqa",
    "text_prior",
    "text_prior_accuracy",
]
