"""The footer, less the keys that do not apply in the current mode or do not fit.

Textual's Footer shows every binding with `show=True`; which keys a user needs depends on the
mode: in diff mode they compare and jump between changes, and the freeze keys (still working,
still in `?` help and the command palette) would only crowd out the ones that matter there.
At 80 columns the full row does not fit either, and Textual cuts it at the edge: `? Help` and
`q Quit`, the two keys a new user looks for, went first (`s S` was the last thing shown). Keys
now give way from the end of the row, whole, and those two always stay.
"""

from __future__ import annotations

from rich.cells import cell_len
from textual import events
from textual.reactive import reactive
from textual.widgets import Footer

# Never dropped for room: how to learn the rest, and how to leave.
ALWAYS_SHOWN = frozenset({"help", "quit_app"})


class ModeFooter(Footer):
    """Attributes down: the app sets `hidden`, the actions whose keys are not advertised."""

    hidden: reactive[frozenset[str]] = reactive(frozenset(), recompose=True)

    def compose(self):
        keys = []
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
            keys.append(widget)
        yield from fit_keys(keys, self.app.size.width)

    def bindings_changed(self, screen) -> None:
        """Textual's Footer schedules one recompose (about twenty keys) per change of bindings:
        each focus change, each mount; start-up asked for ten. Through `refresh(recompose=True)`
        the ones asked for before the footer gets to them make one."""
        self._bindings_ready = True
        if not screen.app.app_focus:
            return
        if self.is_attached and screen is self.screen:
            self.refresh(recompose=True)

    def on_resize(self, event: events.Resize) -> None:
        if event.size.width != getattr(self, "_composed_for", None):
            self._composed_for = event.size.width
            self.refresh(recompose=True)


def key_width(widget: object) -> int:
    """Cells a FooterKey takes: ` key description ` (the non-compact padding, the wider one)."""
    key = getattr(widget, "key_display", "")
    description = getattr(widget, "description", "")
    return cell_len(key) + 2 + (cell_len(description) + 1 if description else 0)


def fit_keys(keys: list, width: int) -> list:
    """`keys` less the ones that do not fit in `width`, dropped whole from the end of the row
    (the row is in the order of importance); the help and quit keys and the command palette's
    key (docked right) always stay."""
    if width <= 0:
        return keys

    def kept(widget: object) -> bool:
        action = getattr(widget, "action", "")
        return (
            isinstance(action, str) and action.removeprefix("app.") in ALWAYS_SHOWN
        ) or "-command-palette" in getattr(widget, "classes", ())

    shown = list(keys)
    while sum(map(key_width, shown)) > width:
        droppable = [i for i, w in enumerate(shown) if not kept(w)]
        if not droppable:
            break
        del shown[droppable[-1]]
    return shown
