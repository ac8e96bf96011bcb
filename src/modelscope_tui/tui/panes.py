"""Who gets the explorer's width: the tree first, then the side panes (plain Python, no Textual).

The tree needs room for its deepest row's name, shape and dtype (ParamTree.needed_width), and
would like one column more (the train column; ParamTree.wanted_width). The details pane and the
GPU panel take what is left: each at its preferred width when there is room, else narrower down
to a minimum, the GPU panel as one line per GPU before it goes, and a pane that still does not
fit is closed (the app says so, and opens it again when the terminal grows). What the tree would
like only narrows the panes, never closes one.
"""

from __future__ import annotations

from dataclasses import dataclass

DETAILS = "details"
GPUS = "gpus"
NARROW = 100  # below this width the details pane starts hidden and the GPU panel is compact
WIDE = 140  # from this width the GPU panel starts shown
# Outer widths (border and padding included, as Textual counts them).
DETAILS_SHARE, DETAILS_MIN, DETAILS_MAX = 0.34, 24, 60
GPU_SHARE, GPU_MIN, GPU_MAX = 0.25, 40, 72  # wide enough for process names and the GPU's name
GPU_COMPACT = 24  # `GPU0 ▮▮▮▯▯▯  50% u47%`, one line per GPU


@dataclass(frozen=True)
class PaneFit:
    details: int | None  # outer width, or None: hidden
    gpus: int | None
    compact: bool  # the GPU panel shows one line per GPU
    closed: tuple[str, ...] = ()  # panes wanted but left out for lack of room


def fit_panes(
    width: int,
    tree_needs: int,
    details: bool,
    gpus: bool,
    opened: str | None = None,
    may_close: bool = True,
    tree_wants: int = 0,
) -> PaneFit:
    """Widths for the wanted panes (`details`, `gpus`) beside a tree that needs `tree_needs`.

    opened: the pane the user just asked for; when both cannot stay, the other one goes.
    may_close: False when only the tree's content grew (a deeper row): panes narrow to their
    minimum then, but a key press deeper into the tree never closes one.
    tree_wants: a width the tree would rather have; panes narrow toward it, down to their minimum."""
    compact = width < NARROW
    want = {DETAILS: details, GPUS: gpus}
    closed: list[str] = []
    # Without `opened`, the GPU panel goes first: the details pane is about the tree's rows.
    order = [p for p in (GPUS, DETAILS) if p != opened] + ([opened] if opened else [])
    while True:
        sizes = _sizes(width, want, compact)
        room = width - tree_needs
        if sum(sizes.values()) <= room or not may_close or not any(want.values()):
            break
        shrunk, shrunk_compact, fits = _shrink(sizes, room, allow_compact=True)
        if fits:
            sizes, compact = shrunk, shrunk_compact
            break
        victim = next(p for p in order if want[p])
        want[victim] = False
        closed.append(victim)
    if not may_close:
        sizes = _shrink(sizes, width - tree_needs, allow_compact=False)[0]
    if tree_wants > tree_needs:
        sizes = _shrink(sizes, width - tree_wants, allow_compact=False)[0]
    return PaneFit(sizes.get(DETAILS), sizes.get(GPUS), compact, tuple(closed))


def _sizes(width: int, want: dict[str, bool], compact: bool) -> dict[str, int]:
    sizes = {}
    if want[DETAILS]:
        sizes[DETAILS] = _clamp(round(width * DETAILS_SHARE), DETAILS_MIN, DETAILS_MAX)
    if want[GPUS]:
        sizes[GPUS] = GPU_COMPACT if compact else _clamp(round(width * GPU_SHARE), GPU_MIN, GPU_MAX)
    return sizes


def _shrink(sizes: dict[str, int], room: int, allow_compact: bool) -> tuple[dict[str, int], bool, bool]:
    """Narrow the panes toward `room`: the details pane to its minimum, then the GPU panel to
    its minimum, then (allow_compact) to one line per GPU. (sizes, compact, whether they fit)."""
    sizes = dict(sizes)
    compact = sizes.get(GPUS) == GPU_COMPACT
    over = sum(sizes.values()) - room
    if over > 0 and DETAILS in sizes:
        cut = min(over, max(0, sizes[DETAILS] - DETAILS_MIN))
        sizes[DETAILS] -= cut
        over -= cut
    if over > 0 and GPUS in sizes and not compact:
        cut = min(over, max(0, sizes[GPUS] - GPU_MIN))
        sizes[GPUS] -= cut
        over -= cut
        if over > 0 and allow_compact:
            over -= sizes[GPUS] - GPU_COMPACT
            sizes[GPUS], compact = GPU_COMPACT, True
    return sizes, compact, over <= 0


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))
