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
            compact = getattr(type(widget), "compact", None)
            if compact is not None and not widget.has_class("-command-palette"):
                # A key starts compact and is then bound to the footer's `compact`: two style
                # updates of the key each (most of start-up's style work). Starting it at the
                # footer's value, the binding changes nothing. (The palette's key is not bound:
                # it stays compact.)
                widget.set_reactive(compact, self.compact)
            yield widget

    def bindings_changed(self, screen) -> None:
        """Textual's Footer schedules one recompose (about twenty keys) per change of bindings:
        each focus change, each mount; start-up asked for ten. Through `refresh(recompose=True)`
        the ones asked for before the footer gets to them make one."""
        self._bindings_ready = True
        if not screen.app.app_focus:
            return
        if self.is_attached and screen is self.screen:
            self.refresh(recompose=True)
