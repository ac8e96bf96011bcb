"""mscope: look inside PyTorch checkpoints without running code from them.

Importing the package stays cheap: no torch, no textual. Heavy pieces are imported where used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

__all__ = ["__version__", "open_checkpoint"]


def open_checkpoint(path: Any) -> Checkpoint:
    """Read a checkpoint's metadata (no tensor bytes, no code from the file)."""
    from .readers import open_checkpoint as _open

    return _open(path)
