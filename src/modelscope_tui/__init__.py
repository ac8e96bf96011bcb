"""mscope: look inside PyTorch checkpoints without running code from them.

Importing the package stays cheap: no torch, no textual. Heavy pieces are imported where used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .training.apply import FreezeReport

__all__ = ["__version__", "apply_freeze_plan", "open_checkpoint"]


def open_checkpoint(path: Any) -> Checkpoint:
    """Read a checkpoint's metadata (no tensor bytes, no code from the file)."""
    from .readers import open_checkpoint as _open

    return _open(path)


def apply_freeze_plan(
    model: Any, plan: Any, strict: bool = False, keep_eval: bool = True
) -> FreezeReport:
    """Set requires_grad and eval mode on `model` from a freeze plan (path or dict).

    See `modelscope_tui.training.apply.apply_freeze_plan`; torch is not imported here, the model brings it.
    """
    from .training.apply import apply_freeze_plan as _apply

    return _apply(model, plan, strict=strict, keep_eval=keep_eval)
