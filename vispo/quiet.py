"""A quiet console for the ``vispo`` commands: what third-party libraries print on their own
(weight-loading bars, an accelerator notice at import) is hidden, and warnings are shown once
each, in one line of vispo's words (``vispo: warning: ...``), without a source line.

Only :func:`vispo.cli.main` calls :func:`quiet_console`; code that imports vispo as a library
keeps its own logging and warning settings.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings

_SEEN: set[str] = set()
_INSTALLED = False


class _DeepSpeedAcceleratorFilter(logging.Filter):
    """DeepSpeed logs "Setting accelerator to CPU ..." when it is imported on a machine without
    a GPU, even when it is never used (transformers and accelerate import it when installed).
    The record is dropped; on a machine with a GPU, where the notice means something, vispo
    says it once in its own words."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "Setting accelerator to CPU" not in record.getMessage():
            return True
        try:
            import torch

            gpu = torch.cuda.is_available()
        except Exception:  # noqa: BLE001 - any failure here only means "no GPU seen"
            gpu = False
        if gpu:
            say_once(
                "DeepSpeed did not detect the GPU and would run on the CPU; set DS_ACCELERATOR=cuda"
            )
        return False


def say_once(message: str, *, stream=None) -> None:
    """Print ``vispo: warning: <message>`` to stderr, once per message."""
    if message in _SEEN:
        return
    _SEEN.add(message)
    print(f"vispo: warning: {message}", file=stream or sys.stderr, flush=True)


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    say_once(text, stream=file)


def quiet_console() -> None:
    """Install the quiet settings (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # The filter sits on DeepSpeed's logger before DeepSpeed creates it (getLogger returns the
    # same object, and DeepSpeed only adds a handler and sets the level).
    logging.getLogger("DeepSpeed").addFilter(_DeepSpeedAcceleratorFilter())
    if importlib.util.find_spec("transformers") is not None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights: 100%|...|" on every model load
    if importlib.util.find_spec("huggingface_hub") is not None:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    warnings.showwarning = _showwarning
    warnings.simplefilter("once")
