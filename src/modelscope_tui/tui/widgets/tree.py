"""The parameter tree: a lazy Textual Tree whose rows are aligned columns drawn at render time.

Labels are computed from the Session when a line is painted, so a freeze of 50k tensors only
costs repainting the visible lines. Children are added when a node is expanded, a page at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.cells import cell_len
from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Tree
from textual.widgets._tree import TreeNode

from ...checkpoint import PARAMETER, ModuleNode, TensorRecord
from ...diff.live import LiveDiff, LiveModule
from ...diff.report import (
    ADDED,
    CHANGED,
    CLOSE,
    DTYPE_CHANGED,
    IDENTICAL,
    PENDING,
    REMOVED,
    RENAMED,
    SHAPE_CHANGED,
    UNREADABLE,
    TensorDiff,
)
from ...training.session import Session
from ...units import fmt_bytes, fmt_count, safe_text, shorten

PAGE = 200  # children added per expansion step; a flat 100k-tensor dict stays responsive
MARGIN = 2  # the vertical scrollbar, and one cell so that a row never touches it
ICON = 2  # "▼ ", "▶ " or "  " before every name
GUIDES = (3, 2)  # cells of indentation per level: 2 when 3 would cost shape, dtype or train
NAME_MIN = 16  # cells a name keeps before a column is dropped ("1 BatchNorm2d"), if it is as long
# Columns in the order a narrow tree drops them, last first: the name and the shape always stay,
# since the shape is what a user reads first. Display order is ORDER / DIFF_ORDER.
PRIORITY = ("shape", "dtype", "train", "device", "numel", "bytes")
DIFF_PRIORITY = ("shape", "dtype", "change", "train", "device", "bytes")
ORDER = ("shape", "dtype", "train", "numel", "bytes", "device")
DIFF_ORDER = ("shape", "dtype", "train", "change", "bytes", "device")
ESSENTIAL = 3  # shape, dtype and train (change): the indentation narrows before one is dropped
RIGHT_ALIGNED = ("numel", "bytes")
# Widths of the columns whose values are words of known length; the others follow their content.
FIXED_WIDTHS = {"train": 5, "change": 12, "device": 7}
# Content widths are capped so that one odd value (a hostile 64-dim shape) cannot take the row.
CONTENT_CAPS = {"shape": 23, "dtype": 18, "numel": 8, "bytes": 10}  # dtype: quant schemes ("fp8 e4m3 block 128")
MARKS = {
    "trainable": ("✓ yes", "green"),
    "frozen": ("✗ no", "red"),
    "mixed": ("◐ mix", "yellow"),
    "lora": ("◆lora", "magenta"),  # a quantized weight chosen as a LoRA target: frozen, adapted
    None: ("", ""),
}
# What the 5-wide train column says for a tensor that cannot train ("buffer" was cut to "buffe").
KIND_LABELS = {"buffer": "buf", "tensor": "data", "parameter": "param"}
# Diff mode: status -> (mark, style, word). Names and the change column take the style. Textual
# maps ANSI names through its terminal theme, where red and magenta (and blue and bright blue) are
# one colour, so the structural statuses use explicit colours that stay apart from the others.
DIFF_MARKS = {
    IDENTICAL: ("=", "green", "same"),
    CLOSE: ("≈", "cyan", "close"),
    CHANGED: ("~", "yellow", "changed"),
    DTYPE_CHANGED: ("≠", "#d7af00", "dtype"),
    SHAPE_CHANGED: ("≠", "bold #d7af00", "shape"),
    RENAMED: ("→", "#a070ff", "renamed"),
    ADDED: ("+", "#3f8cff", "added"),
    REMOVED: ("-", "red", "removed"),
    UNREADABLE: ("!", "bold red", "unreadable"),
    PENDING: ("…", "dim", "pending"),
}


def diff_cell(d: TensorDiff | LiveModule | None) -> tuple[str, str]:
    """The change column of a tensor (its status, and rel. L2 difference when values moved) or
    of a module (its aggregate status and how many of its tensors differ)."""
    if d is None:
        return ("", "")
    status = d.status
    mark, style, word = DIFF_MARKS.get(status, ("?", "", status))
    if isinstance(d, LiveModule):
        if status in (CHANGED, CLOSE):
            return (f"{mark} {d.moved:,}/{d.tensors:,}", style)
        if status == PENDING:
            return (f"{mark} {d.pending:,}", style)
        return (f"{mark} {word}", style)
    if status in (CHANGED, CLOSE) and d.rel_l2 is not None:
        return (f"{mark} {d.rel_l2:.1e}", style)
    return (mark if status == PENDING else f"{mark} {word}", style)


def shape_text(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) or "scalar"


@dataclass(frozen=True, slots=True)
class Layout:
    """Which columns a tree of some width shows, how wide, and the indentation per level."""

    guide: int
    columns: tuple[tuple[str, int], ...]  # (key, width) in display order

    @property
    def fixed(self) -> int:
        """Cells the columns take, one space before each."""
        return sum(w + 1 for _, w in self.columns)


def plan_layout(
    width: int, names: dict[int, int], widths: dict[str, int], diff: bool = False, device: bool = False
) -> Layout:
    """The columns for a tree `width` cells wide whose rows at depth d have names up to
    names[d] cells long.

    Every row ends at the same cell, so a deep row has less room for its name than a shallow
    one. Columns are dropped from the end of the priority list until every row's name gets
    its length or NAME_MIN cells, but the indentation narrows before shape, dtype or train go,
    and shape is never dropped."""
    priority = [k for k in (DIFF_PRIORITY if diff else PRIORITY) if device or k != "device"]
    order = DIFF_ORDER if diff else ORDER
    sized = {k: FIXED_WIDTHS.get(k) or widths[k] for k in priority}

    def layout(guide: int, keys: list[str]) -> Layout:
        return Layout(guide, tuple((k, sized[k]) for k in order if k in keys))

    def short(guide: int, keys: list[str]) -> bool:
        """Would some name get fewer cells than it needs?"""
        room = width - MARGIN - ICON - sum(sized[k] + 1 for k in keys)
        return room < name_cells(names, guide)

    for guide, keep in ((GUIDES[0], ESSENTIAL), (GUIDES[1], ESSENTIAL), (GUIDES[1], 1)):
        keys = list(priority)
        while len(keys) > keep and short(guide, keys):
            keys.pop()
        if not short(guide, keys):
            return layout(guide, keys)
    return layout(GUIDES[1], priority[:1])


def name_cells(names: dict[int, int], guide: int) -> int:
    """Cells from the tree's left edge to the end of the name that needs most: the indentation
    of its depth and the name's length, or NAME_MIN when longer (it is shortened then)."""
    return max((depth * guide + min(n, NAME_MIN) for depth, n in names.items()), default=0)


@dataclass(slots=True)
class Row:
    """What a tree line stands for."""

    module: ModuleNode | None = None
    tensor: TensorRecord | None = None
    depth: int = 0
    more_of: ModuleNode | None = None  # a "load more" line for this module's children
    shown: int = 0  # children already added (for "more" lines)
    ghost: bool = False  # diff mode: only in the other file (A); module/tensor are A's records
    part: bool = False  # a quantized weight's packed data or companion, shown as stored under it

    @property
    def names(self) -> list[str]:
        if self.ghost:
            return []
        if self.tensor is not None:
            return [self.tensor.name]
        if self.module is not None:
            return [t.name for t in self.module.all_tensors()]
        return []


@dataclass(slots=True)
class Seen:
    """What the tree has shown so far: the longest name (with a module's class) at each depth
    and the widest value of each content-sized column. It only grows, so columns do not jump
    as rows come and go."""

    names: dict[int, int] = field(default_factory=lambda: {1: 4})  # before any row: short names
    widths: dict[str, int] = field(
        default_factory=lambda: {"shape": 5, "dtype": 5, "numel": 5, "bytes": 5}
    )

    def note(self, depth: int, name: str, **values: str) -> bool:
        """Record a row; True when something grew (the layout may change)."""
        grew = False
        cells = cell_len(name)  # a CJK name takes two cells a character
        if cells > self.names.get(depth, 0):
            self.names[depth], grew = cells, True
        widths = self.widths
        for key, value in values.items():
            n = min(len(value), CONTENT_CAPS[key])
            if n > widths[key]:
                widths[key], grew = n, True
        return grew

    def needed_width(self) -> int:
        """The width at which every row shows its name (NAME_MIN cells of a longer one), its
        shape and its dtype at the usual indentation: what the side panes leave to the tree
        before they take any."""
        w = self.widths
        return MARGIN + ICON + name_cells(self.names, GUIDES[0]) + w["shape"] + w["dtype"] + 2


class ParamTree(Tree[Row]):
    """Modules and tensors with columns; space toggles freezing, arrows navigate."""

    BINDINGS = [
        Binding("space", "app.toggle_freeze", "Freeze/unfreeze", show=True),
        Binding("right", "expand_node", "Expand", show=False),
        Binding("left", "collapse_node", "Collapse", show=False),
    ]

    class LayoutChanged(Message):
        """The columns changed (a new width, deeper rows, wider values): the column header above
        the tree must follow, and when `need` grew the app gives the tree more room first."""

        def __init__(self, need_changed: bool = False) -> None:
            self.need_changed = need_changed
            super().__init__()

    class RowHighlighted(Message):
        def __init__(self, row: Row | None) -> None:
            self.row = row
            super().__init__()

    def __init__(self, session: Session, **kwargs) -> None:
        super().__init__("model", **kwargs)
        self.session = session
        self.guide_depth = GUIDES[0]
        self.seen = Seen()
        self._layout: Layout | None = None
        # (parent id, width) -> (the siblings' names, name -> how it is shown): see _short_leaf
        self._short: dict[tuple[int, int], tuple[list[str], dict[str, str]]] = {}
        self.sort_by_size = False
        self.visible_modules: set[str] | None = None  # filter: modules on a path to a match
        self.visible_tensors: set[str] | None = None
        self.device_of = None  # callable name -> device string, set once tensors are placed
        self.diff: LiveDiff | None = None  # diff mode: statuses by name, and what only A has

    # -- building ------------------------------------------------------------------------------
    def populate(self) -> None:
        """(Re)build from the session's checkpoint: the root and its first level."""
        self.clear()
        root_module = self.session.ckpt.tree
        self.root.data = Row(module=root_module, depth=0)
        self.root.allow_expand = self._has_children(root_module)
        self._note(self.root.data)
        self._add_children(self.root, root_module, 0)
        self.root.expand()
        self.relayout()

    def _ordered_children(self, module: ModuleNode, ghost: bool = False) -> list[Row]:
        depth_rows: list[Row] = []
        modules = [] if ghost else list(module.children.values())
        # A quantized weight's companions are listed under it (quant.py), not beside it.
        tensors = [] if ghost else [t for t in module.tensors if t.companion_of is None]
        ghost_modules: list[ModuleNode] = []
        ghost_tensors: list[TensorRecord] = []
        if self.diff is not None:
            ghost_modules = [self.diff.a_module(n) or ModuleNode(n) for n in self.diff.ghost_modules(module.name)]
            ghost_tensors = self.diff.ghost_tensors(module.name)
        if self.visible_modules is not None:
            modules = [m for m in modules if m.name in self.visible_modules]
            ghost_modules = [m for m in ghost_modules if m.name in self.visible_modules]
        if self.visible_tensors is not None:
            tensors = [t for t in tensors if t.name in self.visible_tensors]
            ghost_tensors = [t for t in ghost_tensors if t.name in self.visible_tensors]
        if self.sort_by_size:
            modules.sort(key=lambda m: m.stats.nbytes, reverse=True)
            tensors.sort(key=lambda t: t.nbytes, reverse=True)
        depth_rows.extend(Row(tensor=t) for t in tensors)
        depth_rows.extend(Row(tensor=t, ghost=True) for t in ghost_tensors)
        depth_rows.extend(Row(module=m) for m in modules)
        depth_rows.extend(Row(module=m, ghost=True) for m in ghost_modules)
        return depth_rows

    def _has_children(self, module: ModuleNode, ghost: bool = False) -> bool:
        if not ghost and (module.children or module.tensors):
            return True
        return self.diff is not None and bool(
            self.diff.ghost_modules(module.name) or self.diff.ghost_tensors(module.name)
        )

    def _add_children(self, node: TreeNode[Row], module: ModuleNode, start: int) -> None:
        ghost = node.data is not None and node.data.ghost
        rows = self._ordered_children(module, ghost)
        depth = (node.data.depth + 1) if node.data and node.data.more_of is None else node.data.depth
        end = min(len(rows), start + PAGE)
        grew = False
        for row in rows[start:end]:
            row.depth = depth
            grew = self._note(row) or grew
            if row.module is not None:
                node.add(row.module.short_name, row, allow_expand=self._has_children(row.module, row.ghost))
            elif row.tensor.quant is not None and row.tensor.quant.companions and not row.ghost:
                node.add(row.tensor.quant.leaf, row, allow_expand=True)  # its parts fold under it
            else:
                node.add_leaf(row.tensor.name.rsplit(".", 1)[-1], row)
        if end < len(rows):
            node.add_leaf("more", Row(more_of=module, depth=depth, shown=end, ghost=ghost))
        self._short.clear()  # siblings changed
        if grew and self.is_mounted:
            self.relayout(need_changed=True)

    def _note(self, row: Row) -> bool:
        """Widen the content-sized columns for a row about to be shown."""
        if row.tensor is not None:
            t = row.tensor
            q = None if row.part else t.quant
            if q is not None:
                return self.seen.note(
                    row.depth, q.leaf, shape=shape_text(q.logical_shape), dtype=q.scheme,
                    numel=fmt_count(q.logical_numel), bytes=fmt_bytes(q.nbytes),
                )  # fmt: skip
            return self.seen.note(
                row.depth,
                t.name.rsplit(".", 1)[-1],
                shape=shape_text(t.shape),
                dtype=t.dtype,
                numel=fmt_count(t.numel),
                bytes=fmt_bytes(t.nbytes),
            )
        if row.module is not None:
            m = row.module
            label = m.short_name or self.session.ckpt.path.name  # the root shows the file's name
            if m.class_name:
                label += " " + m.class_name
            return self.seen.note(row.depth, label, numel=fmt_count(m.stats.params), bytes=fmt_bytes(m.stats.nbytes))
        return False

    def expand_visible(self, node: TreeNode[Row], budget: int) -> int:
        """Expand `node` and what is under it, depth first, until `budget` rows were added;
        returns the budget left (<= 0: stopped early)."""
        stack = [node]
        while stack and budget > 0:
            current = stack.pop()
            if current.allow_expand:
                current.expand()
                if not current.children and current.data and current.data.module:
                    self._add_children(current, current.data.module, 0)
                budget -= len(current.children)
                stack.extend(reversed(current.children))
        return budget

    def load_more(self, node: TreeNode[Row]) -> None:
        row = node.data
        if row is None or row.more_of is None or node.parent is None:
            return
        parent = node.parent
        node.remove()
        self._add_children(parent, row.more_of, row.shown)

    def _on_tree_node_expanded(self, event: Tree.NodeExpanded[Row]) -> None:
        node = event.node
        if node.children or node.data is None:
            return
        t = node.data.tensor
        if t is not None and t.quant is not None and not node.data.part:
            self._add_parts(node, t)
            return
        if node.data.module is None:
            return
        self._add_children(node, node.data.module, 0)

    def _add_parts(self, node: TreeNode[Row], t: TensorRecord) -> None:
        """A quantized weight's packed data and companions, as stored, under its logical row."""
        grew = False
        records = self.session.records
        for name in (t.name, *t.quant.companions):
            part = records.get(name, t)
            row = Row(tensor=part, depth=node.data.depth + 1, part=True)
            grew = self._note(row) or grew
            node.add_leaf(part.name.rsplit(".", 1)[-1], row)
        self._short.clear()
        if grew and self.is_mounted:
            self.relayout(need_changed=True)

    def _on_tree_node_highlighted(self, event: Tree.NodeHighlighted[Row]) -> None:
        self.post_message(self.RowHighlighted(event.node.data))

    def _on_tree_node_selected(self, event: Tree.NodeSelected[Row]) -> None:
        if event.node.data is not None and event.node.data.more_of is not None:
            event.stop()
            self.load_more(event.node)

    def on_resize(self) -> None:
        self.fit_width()

    def fit_width(self) -> None:
        """Label widths follow the widget's width: rebuild the lines when it changed, or the
        virtual width of the old size stays and a stray horizontal scrollbar appears (e.g. after
        `d` shows the details pane, which sends the tree no Resize)."""
        if self.size.width != getattr(self, "_fitted_width", None):
            self._fitted_width = self.size.width
            self._invalidate()
        self.relayout()

    def relayout(self, need_changed: bool = False) -> None:
        """Choose the columns and the indentation for the current width and content; the header
        follows through LayoutChanged."""
        layout = self._plan()
        changed = layout != self._layout
        self._layout = layout
        if layout.guide != self.guide_depth:
            self.guide_depth = layout.guide  # invalidates the lines
        elif changed:
            self._invalidate()
        if changed or need_changed:
            self.post_message(self.LayoutChanged(need_changed))

    def _plan(self) -> Layout:
        return plan_layout(
            self.size.width, self.seen.names, self.seen.widths, diff=self.diff is not None, device=self.device_of is not None
        )

    def needed_width(self) -> int:
        """What the side panes leave to the tree: names, shapes and dtypes, and in diff mode the
        change column too (it is what that mode is for: at 80 columns the details pane gives
        way rather than hide it)."""
        need = self.seen.needed_width()
        if self.diff is not None:
            need += FIXED_WIDTHS["change"] + 1
        return need

    def wanted_width(self) -> int:
        """needed_width and the train column: what the side panes narrow for, though they do
        not close for it."""
        return self.needed_width() + FIXED_WIDTHS["train"] + 1

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = self._plan()
        return self._layout

    def columns(self) -> tuple[tuple[str, int], ...]:
        return self.layout.columns

    def column_header(self) -> Text:
        """Column titles aligned with the rows (drawn by the app above the tree)."""
        layout = self.layout
        text = Text("  " + "name".ljust(max(4, self._label_width(0) - layout.fixed - ICON)), style="bold")
        for key, w in layout.columns:
            text.append(" " + (key.rjust(w) if key in RIGHT_ALIGNED else key.ljust(w))[:w], style="bold")
        return text

    def action_expand_node(self) -> None:
        node = self.cursor_node
        if node is not None and node.allow_expand:
            node.expand()

    def action_collapse_node(self) -> None:
        node = self.cursor_node
        if node is None:
            return
        if node.is_expanded:
            node.collapse()
        elif node.parent is not None:
            self.move_cursor(node.parent)

    def repaint(self) -> None:
        """Session state changed: redraw visible lines (labels are computed when painted)."""
        self._updates += 1
        self.refresh()

    # -- finding -------------------------------------------------------------------------------
    def reveal(self, tensor_name: str | None = None, module_name: str | None = None) -> TreeNode[Row] | None:
        """Expand the path to a tensor or module (loading pages as needed) and move there."""
        part = self.session.records.get(tensor_name) if tensor_name else None
        if part is not None and part.companion_of is not None:  # under its quantized weight
            weight = self.reveal(tensor_name=part.companion_of)
            if weight is None:
                return None
            weight.expand()
            if not weight.children:
                self._add_parts(weight, weight.data.tensor)
            child = self._find_child(weight, lambda r: r.part and r.tensor is not None and r.tensor.name == tensor_name)
            if child is None:
                return None
            self._tree_lines  # noqa: B018 -- rebuild line numbers now so the cursor lands on `child`
            self.move_cursor(child)
            self.call_after_refresh(self.scroll_to_node, child, False)
            return child
        target_module = module_name if module_name is not None else tensor_name.rpartition(".")[0] if tensor_name else ""
        node = self.root
        if target_module:
            parts = target_module.split(".")
            for i in range(len(parts)):
                name = ".".join(parts[: i + 1])
                node.expand()
                if not node.children and node.data and node.data.module:
                    self._add_children(node, node.data.module, 0)
                child = self._find_child(node, lambda r, n=name: r.module is not None and r.module.name == n)
                if child is None:
                    return None
                node = child
        if tensor_name is not None:
            node.expand()
            if not node.children and node.data and node.data.module:
                self._add_children(node, node.data.module, 0)
            child = self._find_child(node, lambda r: r.tensor is not None and r.tensor.name == tensor_name)
            if child is None:
                return None
            node = child
        self._tree_lines  # noqa: B018 -- rebuild line numbers now so the cursor lands on `node`
        self.move_cursor(node)
        self.call_after_refresh(self.scroll_to_node, node, False)
        return node

    def _find_child(self, node: TreeNode[Row], pred) -> TreeNode[Row] | None:
        while True:
            more = None
            for child in node.children:
                if child.data is None:
                    continue
                if child.data.more_of is not None:
                    more = child
                elif pred(child.data):
                    return child
            if more is None:
                return None
            self.load_more(more)

    # -- painting ------------------------------------------------------------------------------
    def get_label_width(self, node: TreeNode[Row]) -> int:
        return self._label_width(node.data.depth if node.data else 0)

    def _label_width(self, depth: int) -> int:
        """Every row ends at the same cell; a row deeper than the layout planned for keeps a
        few cells of name and its columns (the tree scrolls sideways then, never drops shape)."""
        return max(ICON + 4 + self.layout.fixed, self.size.width - MARGIN - depth * self.guide_depth)

    def render_label(self, node: TreeNode[Row], base_style: Style, style: Style) -> Text:
        row = node.data
        if row is None:
            return Text(safe_text(node.label.plain if isinstance(node.label, Text) else str(node.label)))
        layout = self.layout
        name_width = self._label_width(row.depth) - layout.fixed - ICON
        icon = ("▼ " if node.is_expanded else "▶ ") if node.allow_expand else "  "
        text = Text(icon, style=base_style)
        if row.more_of is not None:
            remaining = len(self._ordered_children(row.more_of, row.ghost)) - row.shown
            text.append(f"… {remaining:,} more (enter to load)", style="italic")
            text.stylize(style)
            return text
        cells: dict[str, tuple[str, str]] = {}
        if row.ghost:
            leaf, name = self._ghost_label(row, cells)
        elif row.tensor is not None and row.tensor.quant is not None and not row.part:
            t, q = row.tensor, row.tensor.quant
            leaf = safe_text(q.leaf)  # the logical weight: its shape, scheme, parameters, real bytes
            name = Text(leaf)
            cells["shape"] = (shape_text(q.logical_shape), "")
            cells["dtype"] = (safe_text(q.scheme), "cyan")
            # a quantized base never trains (checkpoint.trains); chosen, it carries a LoRA adapter
            cells["train"] = MARKS["lora" if self.session.is_lora_target(t.name) else "frozen"]
            cells["numel"] = (fmt_count(q.logical_numel), "")
            cells["bytes"] = (fmt_bytes(q.nbytes), "")
            if self.device_of is not None:
                cells["device"] = (self.device_of(t.name), "magenta")
            if self.diff is not None:
                self._diff_cells(self.diff.tensor(t.name), name, cells)
        elif row.tensor is not None:
            t = row.tensor
            # Names from the file: every unsafe character escaped (units.safe_text).
            leaf = safe_text(t.name.rsplit(".", 1)[-1])
            suffix = safe_text(f" = {t.alias_of}" if t.alias_of else f" ~ {t.tied_to}" if t.tied_to else "")
            name = Text(leaf, style="" if t.kind == PARAMETER else "italic dim")
            name.append(suffix, style="magenta")
            cells["shape"] = (shape_text(t.shape), "")
            cells["dtype"] = (safe_text(t.dtype), "cyan")
            if self.session.can_train(t.name):
                cells["train"] = MARKS["trainable" if self.session.is_trainable(t.name) else "frozen"]
            else:
                cells["train"] = (KIND_LABELS.get(t.kind, t.kind[:5]), "dim")
            cells["numel"] = (fmt_count(t.numel), "")
            cells["bytes"] = (fmt_bytes(t.nbytes), "")
            if self.device_of is not None:
                cells["device"] = (self.device_of(t.name), "magenta")
            if self.diff is not None:
                d = self.diff.tensor(t.name)
                self._diff_cells(d, name, cells)
                if d is not None and d.status == RENAMED and d.a_name:
                    name.append(f" ← {safe_text(d.a_name)}", style="dim")
        else:
            m = row.module
            leaf = safe_text(m.short_name or self.session.ckpt.path.name)
            name = Text(leaf, style="bold")
            if m.class_name:
                name.append(f" {safe_text(m.class_name)}", style="cyan")
            state = self.session.node_state(m)
            cells["train"] = MARKS[state]
            cells["numel"] = (fmt_count(m.stats.params) if m.stats.params else "-", "")
            cells["bytes"] = (fmt_bytes(m.stats.nbytes), "")
            if self.device_of is not None:
                devices = {self.device_of(t.name) for t in m.all_tensors()}
                cells["device"] = (devices.pop() if len(devices) == 1 else "mixed" if devices else "", "magenta")
            if self.diff is not None:
                self._diff_cells(self.diff.module(m.name), name, cells)
        text.append_text(self._fit_name(node, leaf, name, name_width))
        for key, w in layout.columns:
            value, cell_style = cells.get(key, ("", ""))
            if len(value) > w:
                value = value[: w - 1] + "…"
            cell = Text(" " + (value.rjust(w) if key in RIGHT_ALIGNED else value.ljust(w)))
            if cell_style:
                cell.stylize(cell_style)
            text.append_text(cell)
        text.stylize(style)
        return text

    def _fit_name(self, node: TreeNode[Row], leaf: str, name: Text, width: int) -> Text:
        """The name cell: the whole name when it fits; else what follows the name (class,
        tie, rename) is cut first; a name that is itself too long is shortened so that it
        still differs from every sibling's."""
        if name.cell_len > width and len(leaf) >= width:
            shown = self._short_leaf(node, leaf, width)
            short = Text(shown, style=name.style)
            for span in name.spans:
                if span.start < len(leaf):  # the name's own styles (a diff status colour)
                    short.stylize(span.style, 0, len(shown))
            name = short
        name.truncate(width, overflow="ellipsis", pad=True)
        return name

    def _short_leaf(self, node: TreeNode[Row], leaf: str, width: int) -> str:
        """shorten() against the siblings, remembered per parent and width until children change."""
        parent = node.parent
        if parent is None:
            return shorten(leaf, width)
        key = (parent.id, width)
        if key not in self._short:
            self._short[key] = ([self._leaf_of(child) for child in parent.children], {})
        siblings, shown = self._short[key]
        if leaf not in shown:
            shown[leaf] = shorten(leaf, width, siblings)
        return shown[leaf]

    @staticmethod
    def _leaf_of(node: TreeNode[Row]) -> str:
        row = node.data
        if row is None or row.more_of is not None:
            return ""
        if row.tensor is not None:
            if row.tensor.quant is not None and not row.part:
                return safe_text(row.tensor.quant.leaf)
            return safe_text(row.tensor.name.rsplit(".", 1)[-1])
        return safe_text(row.module.short_name) if row.module is not None else ""

    def _diff_cells(self, d: TensorDiff | LiveModule | None, name: Text, cells: dict[str, tuple[str, str]]) -> None:
        """Diff mode: the change column, and the name in the colour of its status."""
        cells["change"] = diff_cell(d)
        if d is None:
            return
        style = DIFF_MARKS.get(d.status, ("", "", ""))[1]
        if style and d.status != PENDING:
            name.stylize(style, 0, len(name.plain.split(" ", 1)[0]))
        if isinstance(d, TensorDiff) and d.status in (DTYPE_CHANGED, SHAPE_CHANGED):
            key = "dtype" if d.status == DTYPE_CHANGED else "shape"
            cells[key] = (cells.get(key, ("", ""))[0], style)

    def _ghost_label(self, row: Row, cells: dict[str, tuple[str, str]]) -> tuple[str, Text]:
        """A row for what only A has: removed (or renamed away), in A's terms: (name, label)."""
        if row.tensor is not None:
            t = row.tensor
            leaf = safe_text(t.name.rsplit(".", 1)[-1])
            name = Text(leaf, style="italic")
            cells["shape"] = (shape_text(t.shape), "dim")
            cells["dtype"] = (safe_text(t.dtype), "dim")
            cells["numel"] = (fmt_count(t.numel), "dim")
            cells["bytes"] = (fmt_bytes(t.nbytes), "dim")
            d = self.diff.a_tensor(t.name) if self.diff is not None else None
            self._diff_cells(d, name, cells)
            if d is not None and d.status == RENAMED and d.b_name:
                name.append(f" → {safe_text(d.b_name)}", style="dim")
            return leaf, name
        m = row.module
        leaf = safe_text(m.short_name)
        name = Text(leaf, style="bold italic")
        if m.class_name:
            name.append(f" {safe_text(m.class_name)}", style="dim cyan")
        cells["bytes"] = (fmt_bytes(m.stats.nbytes), "dim") if m.stats.nbytes else ("", "")
        if self.diff is not None:
            self._diff_cells(self.diff.module(m.name), name, cells)
        return leaf, name
