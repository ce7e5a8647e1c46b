"""Video questions as a sequence of frame images (no torchvision).

What was built, and why: the Qwen-VL models have a video path (``pixel_values_videos``,
``video_grid_thw``, ``<|video_pad|>`` tokens) that transformers fills through a *video processor*,
and every Qwen-VL video processor needs torchvision, which vispo must not install. Feeding that
path by hand would mean re-implementing the video processor's temporal patching and token
expansion, plus a second pixel layout through encoding, rollout and scoring. vispo instead feeds
the frames **as images**: a video row becomes a :class:`~vispo.data.Sample` whose images are the
sampled frames, in order. Everything that works on images then works on video rows unchanged
(PAPO masks each frame, CPPO and VPPO perturb each frame, NoisyRollout noises each frame).

The difference from the model's video path: each frame is a separate image, tiled twice along
the temporal patch axis, so it costs the full image tokens (the video path merges each pair of
consecutive frames into one temporal patch: half the tokens), and frames are ordered only by
their place in the prompt (the video path also gives M-RoPE temporal positions that advance per
frame pair). A model fine-tuned this way sees videos the way it sees multi-image prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vispo.data.sample import DataError, Sample

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def frame_indices(n_frames: int, num_frames: int) -> list[int]:
    """Indices of ``num_frames`` frames spread uniformly over ``n_frames`` (first and last
    included, ``round(i * (n - 1) / (k - 1))``); all frames when ``num_frames >= n_frames``."""
    if n_frames < 1:
        raise DataError("a video needs at least one frame")
    if num_frames < 1:
        raise DataError(f"num_frames must be >= 1, got {num_frames}")
    if num_frames >= n_frames:
        return list(range(n_frames))
    if num_frames == 1:
        return [0]
    return [int(i * (n_frames - 1) / (num_frames - 1) + 0.5) for i in range(num_frames)]


def video_frames(source: str | Path | Sequence) -> list:
    """The frame sources of a video: a folder of frame images (sorted by name) or a list of
    image sources (paths, bytes, arrays, PIL images)."""
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.is_dir():
            raise DataError(
                f"video {str(source)!r}: give a folder of frame images (decoding video files "
                "needs a video library vispo does not depend on)"
            )
        frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not frames:
            raise DataError(f"video folder {str(source)!r} holds no frame images")
        return [str(p) for p in frames]
    frames = list(source)
    if not frames:
        raise DataError("a video needs at least one frame")
    return frames


def video_sample(
    id: str,
    video: str | Path | Sequence,
    question: str,
    answer: str,
    *,
    num_frames: int = 8,
    meta: dict | None = None,
) -> Sample:
    """A :class:`Sample` whose images are ``num_frames`` uniformly sampled frames of ``video``.

    ``meta["video_frames"]`` records the chosen frame indices and ``meta["video_length"]`` the
    number of frames in the source.
    """
    frames = video_frames(video)
    idx = frame_indices(len(frames), num_frames)
    info = {**(meta or {}), "video_frames": idx, "video_length": len(frames)}
    return Sample(
        id=id, images=[frames[i] for i in idx], question=question, answer=answer, meta=info
    )
