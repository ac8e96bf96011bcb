"""The footer, less the keys that do not apply in the current mode.

Textual's Footer shows every binding with `show=True`; which keys a user needs depends on the
mode: in diff mode they compare and jump between changes, and the freeze keys (still working,
still in `?` help and the command palette) would only crowd out the ones that matter there.
"""

from __future__ import annotations

from textual.reactive import reactive
from textual.widgets import Footer


class ModeFooter(Footer):
    """Attributes down: the app sets `hidden`, the actions whose keys are not advertised."""

    hidden: reactive[frozenset[str]] = reactive(frozenset(), recompose=True)

    def compose(self):
        for widget in super().compose():
            action = getattr(widget, "action", None)  # a FooterKey (its class is not public)
            if isinstance(action, str) and action.removeprefix("app.") in self.hidden:
                continue
            yield widget
