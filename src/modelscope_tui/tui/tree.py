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

from ..checkpoint import PARAMETER, ModuleNode, TensorRecord
from ..session import Session
from ..units import fmt_bytes, fmt_count

PAGE = 200  # children added per expansion step; a flat 100k-tensor dict stays responsive
GUIDE = 3
COLUMNS = (("shape", 13), ("dtype", 9), ("train", 5), ("numel", 7), ("bytes", 9))
MARKS = {
    "trainable": ("✓ yes", "green"),
    "frozen": ("✗ no", "red"),
    "mixed": ("◐ mix", "yellow"),
    None: ("", ""),
}


@dataclass(slots=True)
class Row:
    """What a tree line stands for."""

    module: ModuleNode | None = None
    tensor: TensorRecord | None = None
    depth: int = 0
    more_of: ModuleNode | None = None  # a "load more" line for this module's children
    shown: int = 0  # children already added (for "more" lines)

    @property
    def names(self) -> list[str]:
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

    # -- building ------------------------------------------------------------------------------
    def populate(self) -> None:
        """(Re)build from the session's checkpoint: the root and its first level."""
        self.clear()
        root_module = self.session.ckpt.tree
        self.root.data = Row(module=root_module, depth=0)
        self.root.allow_expand = bool(root_module.children or root_module.tensors)
        self._add_children(self.root, root_module, 0)
        self.root.expand()

    def _ordered_children(self, module: ModuleNode) -> list[Row]:
        depth_rows: list[Row] = []
        modules = list(module.children.values())
        tensors = list(module.tensors)
        if self.visible_modules is not None:
            modules = [m for m in modules if m.name in self.visible_modules]
        if self.visible_tensors is not None:
            tensors = [t for t in tensors if t.name in self.visible_tensors]
        if self.sort_by_size:
            modules.sort(key=lambda m: m.stats.nbytes, reverse=True)
            tensors.sort(key=lambda t: t.nbytes, reverse=True)
        depth_rows.extend(Row(tensor=t) for t in tensors)
        depth_rows.extend(Row(module=m) for m in modules)
        return depth_rows

    def _add_children(self, node: TreeNode[Row], module: ModuleNode, start: int) -> None:
        rows = self._ordered_children(module)
        depth = (node.data.depth + 1) if node.data and node.data.more_of is None else node.data.depth
        end = min(len(rows), start + PAGE)
        for row in rows[start:end]:
            row.depth = depth
            if row.module is not None:
                has_children = bool(row.module.children or row.module.tensors)
                node.add(row.module.short_name, row, allow_expand=has_children)
            else:
                node.add_leaf(row.tensor.name.rsplit(".", 1)[-1], row)
        if end < len(rows):
            node.add_leaf("more", Row(more_of=module, depth=depth, shown=end))

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
        self.post_message(self.Resized())

    def columns(self) -> tuple[tuple[str, int], ...]:
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
            return Text(str(node.label))
        width = self._label_width(row.depth)
        columns = self.columns()
        fixed = sum(w + 1 for _, w in columns)
        name_width = max(8, width - fixed - 2)
        icon = ("▼ " if node.is_expanded else "▶ ") if node.allow_expand else "  "
        text = Text(icon, style=base_style)
        if row.more_of is not None:
            remaining = len(self._ordered_children(row.more_of)) - row.shown
            text.append(f"… {remaining:,} more (enter to load)", style="italic")
            text.stylize(style)
            return text
        cells: dict[str, tuple[str, str]] = {}
        if row.tensor is not None:
            t = row.tensor
            leaf = t.name.rsplit(".", 1)[-1]
            suffix = f" = {t.alias_of}" if t.alias_of else f" ~ {t.tied_to}" if t.tied_to else ""
            name = Text(leaf, style="" if t.kind == PARAMETER else "italic dim")
            name.append(suffix, style="magenta")
            cells["shape"] = ("×".join(map(str, t.shape)) or "scalar", "")
            cells["dtype"] = (t.dtype, "cyan")
            if self.session.can_train(t.name):
                cells["train"] = MARKS["trainable" if self.session.is_trainable(t.name) else "frozen"]
            else:
                cells["train"] = (t.kind[:6], "dim")
            cells["numel"] = (fmt_count(t.numel), "")
            cells["bytes"] = (fmt_bytes(t.nbytes), "")
            if self.device_of is not None:
                cells["device"] = (self.device_of(t.name), "magenta")
        else:
            m = row.module
            label = m.short_name or self.session.ckpt.path.name
            name = Text(label, style="bold")
            if m.class_name:
                name.append(f" {m.class_name}", style="cyan")
            state = self.session.node_state(m)
            cells["train"] = MARKS[state]
            cells["numel"] = (fmt_count(m.stats.params) if m.stats.params else "-", "")
            cells["bytes"] = (fmt_bytes(m.stats.nbytes), "")
            if self.device_of is not None:
                devices = {self.device_of(t.name) for t in m.all_tensors()}
                cells["device"] = (devices.pop() if len(devices) == 1 else "mixed" if devices else "", "magenta")
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
