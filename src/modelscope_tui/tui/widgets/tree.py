"""The parameter tree: a lazy Textual Tree whose rows are aligned columns drawn at render time.

Labels are computed from the Session when a line is painted, so a freeze of 50k tensors only
costs repainting the visible lines. Children are added when a node is expanded, a page at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

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
from ...units import fmt_bytes, fmt_count, safe_text

PAGE = 200  # children added per expansion step; a flat 100k-tensor dict stays responsive
GUIDE = 3
COLUMNS = (("shape", 13), ("dtype", 9), ("train", 5), ("numel", 7), ("bytes", 9))
MARKS = {
    "trainable": ("✓ yes", "green"),
    "frozen": ("✗ no", "red"),
    "mixed": ("◐ mix", "yellow"),
    None: ("", ""),
}
# What the 5-wide train column says for a tensor that cannot train ("buffer" was cut to "buffe").
KIND_LABELS = {"buffer": "buf", "tensor": "data", "parameter": "param"}
DIFF_COLUMNS = (("shape", 13), ("dtype", 9), ("change", 11), ("bytes", 9))
DIFF_TRAIN_WIDTH = 110  # diff mode keeps the train column from this tree width
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


@dataclass(slots=True)
class Row:
    """What a tree line stands for."""

    module: ModuleNode | None = None
    tensor: TensorRecord | None = None
    depth: int = 0
    more_of: ModuleNode | None = None  # a "load more" line for this module's children
    shown: int = 0  # children already added (for "more" lines)
    ghost: bool = False  # diff mode: only in the other file (A); module/tensor are A's records

    @property
    def names(self) -> list[str]:
        if self.ghost:
            return []
        if self.tensor is not None:
            return [self.tensor.name]
        if self.module is not None:
            return [t.name for t in self.module.all_tensors()]
        return []


class ParamTree(Tree[Row]):
    """Modules and tensors with columns; space toggles freezing, arrows navigate."""

    BINDINGS = [
        Binding("space", "app.toggle_freeze", "Freeze/unfreeze", show=True),
        Binding("right", "expand_node", "Expand", show=False),
        Binding("left", "collapse_node", "Collapse", show=False),
    ]

    class Resized(Message):
        """The width changed: the column header above the tree must follow."""

    class RowHighlighted(Message):
        def __init__(self, row: Row | None) -> None:
            self.row = row
            super().__init__()

    def __init__(self, session: Session, **kwargs) -> None:
        super().__init__("model", **kwargs)
        self.session = session
        self.guide_depth = GUIDE
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
        self._add_children(self.root, root_module, 0)
        self.root.expand()

    def _ordered_children(self, module: ModuleNode, ghost: bool = False) -> list[Row]:
        depth_rows: list[Row] = []
        modules = [] if ghost else list(module.children.values())
        tensors = [] if ghost else list(module.tensors)
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
        for row in rows[start:end]:
            row.depth = depth
            if row.module is not None:
                node.add(row.module.short_name, row, allow_expand=self._has_children(row.module, row.ghost))
            else:
                node.add_leaf(row.tensor.name.rsplit(".", 1)[-1], row)
        if end < len(rows):
            node.add_leaf("more", Row(more_of=module, depth=depth, shown=end, ghost=ghost))

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
        if node.children or node.data is None or node.data.module is None:
            return
        self._add_children(node, node.data.module, 0)

    def _on_tree_node_highlighted(self, event: Tree.NodeHighlighted[Row]) -> None:
        self.post_message(self.RowHighlighted(event.node.data))

    def _on_tree_node_selected(self, event: Tree.NodeSelected[Row]) -> None:
        if event.node.data is not None and event.node.data.more_of is not None:
            event.stop()
            self.load_more(event.node)

    def on_resize(self) -> None:
        self.fit_width()
        self.post_message(self.Resized())

    def fit_width(self) -> None:
        """Label widths follow the widget's width: rebuild the lines when it changed, or the
        virtual width of the old size stays and a stray horizontal scrollbar appears (e.g. after
        `d` shows the details pane, which sends the tree no Resize)."""
        if self.size.width != getattr(self, "_fitted_width", None):
            self._fitted_width = self.size.width
            self._invalidate()

    def columns(self) -> tuple[tuple[str, int], ...]:
        if self.diff is not None:
            columns = DIFF_COLUMNS
            if self.size.width >= DIFF_TRAIN_WIDTH:
                columns = (*columns[:2], COLUMNS[2], *columns[2:])
            columns = columns[1:] if self.size.width < 70 else columns
            columns = columns[:-1] if self.size.width < 56 else columns  # keep the change column
        else:
            columns = COLUMNS[1:] if self.size.width < 70 else COLUMNS
        if self.device_of is not None:
            columns = (*columns, ("device", 7))
        return columns

    def column_header(self) -> Text:
        """Column titles aligned with the rows (drawn by the app above the tree)."""
        width = self._label_width(0)
        columns = self.columns()
        fixed = sum(w + 1 for _, w in columns)
        text = Text("  " + "name".ljust(max(8, width - fixed - 2)), style="bold")
        for key, w in columns:
            text.append(" " + (key.rjust(w) if key in ("numel", "bytes") else key.ljust(w)), style="bold")
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
        return max(20, self.size.width - 2 - depth * GUIDE)

    def render_label(self, node: TreeNode[Row], base_style: Style, style: Style) -> Text:
        row = node.data
        if row is None:
            return Text(safe_text(node.label.plain if isinstance(node.label, Text) else str(node.label)))
        width = self._label_width(row.depth)
        columns = self.columns()
        fixed = sum(w + 1 for _, w in columns)
        name_width = max(8, width - fixed - 2)
        icon = ("▼ " if node.is_expanded else "▶ ") if node.allow_expand else "  "
        text = Text(icon, style=base_style)
        if row.more_of is not None:
            remaining = len(self._ordered_children(row.more_of, row.ghost)) - row.shown
            text.append(f"… {remaining:,} more (enter to load)", style="italic")
            text.stylize(style)
            return text
        cells: dict[str, tuple[str, str]] = {}
        if row.ghost:
            name = self._ghost_label(row, cells)
        elif row.tensor is not None:
            t = row.tensor
            # Names from the file: every unsafe character escaped (units.safe_text).
            leaf = safe_text(t.name.rsplit(".", 1)[-1])
            suffix = safe_text(f" = {t.alias_of}" if t.alias_of else f" ~ {t.tied_to}" if t.tied_to else "")
            name = Text(leaf, style="" if t.kind == PARAMETER else "italic dim")
            name.append(suffix, style="magenta")
            cells["shape"] = ("×".join(map(str, t.shape)) or "scalar", "")
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
            label = safe_text(m.short_name or self.session.ckpt.path.name)
            name = Text(label, style="bold")
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
        name.truncate(name_width, overflow="ellipsis", pad=True)
        text.append_text(name)
        for key, w in columns:
            value, cell_style = cells.get(key, ("", ""))
            cell = Text(" " + value[:w].rjust(w) if key in ("numel", "bytes") else " " + value[:w].ljust(w))
            if cell_style:
                cell.stylize(cell_style)
            text.append_text(cell)
        text.stylize(style)
        return text

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

    def _ghost_label(self, row: Row, cells: dict[str, tuple[str, str]]) -> Text:
        """A row for what only A has: removed (or renamed away), in A's terms."""
        if row.tensor is not None:
            t = row.tensor
            name = Text(safe_text(t.name.rsplit(".", 1)[-1]), style="italic")
            cells["shape"] = ("×".join(map(str, t.shape)) or "scalar", "dim")
            cells["dtype"] = (safe_text(t.dtype), "dim")
            cells["numel"] = (fmt_count(t.numel), "dim")
            cells["bytes"] = (fmt_bytes(t.nbytes), "dim")
            d = self.diff.a_tensor(t.name) if self.diff is not None else None
            self._diff_cells(d, name, cells)
            if d is not None and d.status == RENAMED and d.b_name:
                name.append(f" → {safe_text(d.b_name)}", style="dim")
            return name
        m = row.module
        name = Text(safe_text(m.short_name), style="bold italic")
        if m.class_name:
            name.append(f" {safe_text(m.class_name)}", style="dim cyan")
        cells["bytes"] = (fmt_bytes(m.stats.nbytes), "dim") if m.stats.nbytes else ("", "")
        if self.diff is not None:
            self._diff_cells(self.diff.module(m.name), name, cells)
        return name

