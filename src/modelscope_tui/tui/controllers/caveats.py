"""Warnings that follow freeze changes, said once per change of what they are about."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...training.session import Session


class NormCaveat:
    """Frozen norm layers with running statistics still update them in train mode unless eval
    mode is recorded (b). Said when that set of layers changes, not after every action."""

    def __init__(self) -> None:
        self.warned: frozenset[str] = frozenset()

    def check(self, session: Session) -> str | None:
        pending = frozenset(m for m in session.frozen_norm_layers() if m not in session.eval_modules)
        if pending == self.warned:
            return None
        self.warned = pending
        if not pending:
            return None
        return (
            f"{len(pending)} frozen norm layer(s) still update running statistics in train mode; "
            "press b to record eval mode for them in the plan"
        )
