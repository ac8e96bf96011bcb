"""The GPU side panel: one block per GPU (memory bar, sparkline, utilisation, processes).

It only draws what it is given: the app sets `sample`, `histories` and `estimate_lines`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Group, RenderableType
from rich.text import Text
from textual.content import Content
from textual.geometry import Region
from textual.reactive import reactive
from textual.widget import Widget

from ...gpu.na import NA, na_or
from ...units import fmt_bytes, safe_text, sparkline

if TYPE_CHECKING:  # the explorer starts without the GPU layer; it comes with the first sample
    from ...gpu.snapshot import GpuSample, GpuSnapshot

BAR_WIDTH = 20


def memory_bar(gpu: GpuSnapshot, width: int) -> Text:
    """Used / total, with this process's share drawn in its own colour."""
    text = Text()
    if gpu.memory_total is NA or gpu.memory_used is NA or not gpu.memory_total:
        text.append("memory n/a", style="dim")
        return text
    total = gpu.memory_total
    mine = gpu.self_process.used_memory if gpu.self_process and gpu.self_process.used_memory is not NA else 0
    if gpu.torch_memory is not None:
        mine = max(mine, gpu.torch_memory.reserved)
    used_cells = round(gpu.memory_used / total * width)
    mine_cells = min(used_cells, round(mine / total * width))
    fraction = gpu.memory_used / total
    colour = "red" if fraction > 0.9 else "yellow" if fraction > 0.7 else "green"
    text.append("█" * mine_cells, style="magenta")
    text.append("█" * (used_cells - mine_cells), style=colour)
    text.append("░" * (width - used_cells), style="dim")
    text.append(f" {fmt_bytes(gpu.memory_used)}/{fmt_bytes(total)}")
    return text


def gpu_block(gpu: GpuSnapshot, history: list[int], width: int) -> RenderableType:
    title = Text(f"{gpu.label} ", style="bold")
    title.append(safe_text(gpu.name), style="cyan")
    if gpu.lost or gpu.status:
        return Group(title, Text(gpu.status or "lost", style="red"))
    lines: list[RenderableType] = [title, memory_bar(gpu, max(6, min(BAR_WIDTH, width - 20)))]
    total = gpu.memory_total if gpu.memory_total is not NA else None
    spark = sparkline(history, max(8, width - 2), top=total)
    if spark:
        lines.append(Text(spark, style="green"))
    stats = Text(
        f"util {na_or(gpu.util_gpu)}% · mem {na_or(gpu.util_memory)}% · "
        f"{na_or(gpu.temperature)}°C · {na_or(gpu.power_draw, lambda w: f'{w:.0f}')}/"
        f"{na_or(gpu.power_limit, lambda w: f'{w:.0f}')} W",
        style="dim",
    )
    lines.append(stats)
    if gpu.torch_memory is not None:
        tm = gpu.torch_memory
        lines.append(
            Text(
                f"torch: {fmt_bytes(tm.allocated)} allocated, {fmt_bytes(tm.reserved)} reserved, "
                f"peak {fmt_bytes(tm.max_allocated)}",
                style="magenta",
            )
        )
    procs = sorted(gpu.processes, key=lambda p: 0 if p.used_memory is NA else -p.used_memory)[:3]
    name_width = max(14, width - 22)  # what is left beside the pid and the memory figure (`12.3 GiB`)
    for p in procs:
        style = "bold magenta" if p.is_self else ""
        name = safe_text(na_or(p.name))[:name_width]
        lines.append(Text(f"  {p.pid:>7} {name:<{name_width}} {na_or(p.used_memory, fmt_bytes)}", style=style))
    return Group(*lines)


def gpu_line(gpu: GpuSnapshot) -> Text:
    """One line per GPU for narrow terminals: `GPU0 ▮▮▮▯▯▯ 48% u93%`."""
    if gpu.lost or gpu.status:
        return Text(f"GPU{gpu.nvml_index} {(gpu.status or 'lost')[:20]}", style="red")
    text = Text(f"GPU{gpu.nvml_index} ")
    fraction = gpu.memory_fraction
    if fraction is NA:
        text.append("mem n/a", style="dim")
    else:
        cells = round(fraction * 6)
        colour = "red" if fraction > 0.9 else "yellow" if fraction > 0.7 else "green"
        text.append("▮" * cells, style=colour)
        text.append("▯" * (6 - cells), style="dim")
        text.append(f" {fraction * 100:3.0f}%")
    text.append(f" u{na_or(gpu.util_gpu)}%", style="dim")
    return text


def _as_one_text(parts: list[RenderableType]) -> RenderableType:
    """One Text with newlines renders several times faster than a Group of lines (1 s ticks)."""
    lines: list[Text] = []
    for part in parts:
        if isinstance(part, Group):
            lines.extend(part.renderables)  # type: ignore[arg-type]
        else:
            lines.append(part)  # type: ignore[arg-type]
    if not all(isinstance(line, Text) for line in lines):
        return Group(*lines)
    out = Text("\n").join(lines)
    out.no_wrap = True
    out.overflow = "ellipsis"
    return out


class GpuPanel(Widget):
    """Side panel. Attributes down: the app sets `sample`, `histories`, `estimate_lines`."""

    DEFAULT_CSS = """
    GpuPanel {
        width: 25%;  /* grows with wide terminals, so GPU and process names fit */
        min-width: 40;
        max-width: 72;
        height: 100%;
        border-left: vkey $primary;
        padding: 0 1;
        overflow-y: auto;
    }
    GpuPanel.-compact {
        width: 24;
        min-width: 24;
    }
    """

    # repaint=False: refresh_panel decides whether a new sample changes what is on screen
    sample: reactive[GpuSample | None] = reactive(None, always_update=True, repaint=False)
    compact: reactive[bool] = reactive(False)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.histories: dict[int, list[int]] = {}
        self.estimate_lines: list[Text] = []
        self.placement_line: str = ""
        self._shown: tuple[int, RenderableType | None] = (0, None)  # (width, what was drawn)

    def watch_compact(self, compact: bool) -> None:
        self.set_class(compact, "-compact")
        self.refresh_panel()

    def watch_sample(self, sample: GpuSample | None) -> None:
        self.refresh_panel()

    def refresh_panel(self) -> None:
        # The panel's size never depends on its content: repaint without a layout pass. And only
        # when what it shows changed: each repaint costs a compositor pass over the whole screen,
        # and an idle real GPU shows the same figures tick after tick (on an H200 the idle
        # explorer used 1-2% of a core, at the 2% target, before this).
        content = self.render_panel()
        width, before = self._shown
        if width == self.size.width and content == before:
            return
        self._shown = (self.size.width, content)
        self.refresh(*self._changed_lines(before, content))

    def _changed_lines(self, before: RenderableType | None, after: RenderableType) -> list[Region]:
        """The rows to repaint when only some lines changed (the sparkline and a figure or two on
        a tick; the estimate after a freeze): the compositor's cost grows with the rows it
        redraws. A line wider than the panel wraps (the no-driver status, the host RAM line, a
        long GPU name): it takes the rows Textual gives it, so the lines below are still found.
        No regions (a full repaint) when the number of lines changed, a changed line now wraps to
        another height, or the content is not plain lines."""
        if not isinstance(before, Text) or not isinstance(after, Text) or self.size.width != self._shown[0]:
            return []
        old, new = before.split(allow_blank=True), after.split(allow_blank=True)
        if len(old) != len(new):
            return []
        width, height, top = self.size.width, self.size.height, self.scroll_offset.y
        if width <= 0 or height <= 0:  # hidden or not laid out yet: nothing on screen to spare
            return []
        regions: list[Region] = []
        y = -top
        for a, b in zip(old, new):
            rows = self._rows(b, width)
            if a != b:
                if rows != self._rows(a, width):
                    return []  # every row below it moves
                regions.extend(Region(0, row, width, 1) for row in range(y, y + rows) if 0 <= row < height)
            y += rows
        return regions

    def _rows(self, line: Text, width: int) -> int:
        if line.cell_len <= width:
            return 1
        return Content(line.plain).get_height(self.styles, width)  # Textual's own wrapping

    def render(self) -> RenderableType:
        width, content = self._shown
        if content is None or width != self.size.width:  # first paint, or resized since
            self._shown = (self.size.width, self.render_panel())
        return self._shown[1]

    def render_panel(self) -> RenderableType:
        sample = self.sample
        width = max(20, (self.size.width or 40) - 2)
        parts: list[RenderableType] = []
        if sample is None:
            parts.append(Text("GPUs: sampling…", style="dim"))
        else:
            title = Text("GPUs", style="bold underline")
            if sample.simulated:
                title.append("  SIMULATED", style="bold yellow")
            if not self.compact:
                parts.append(title)
            if not sample.ok:
                parts.append(Text(sample.status, style="yellow"))
                parts.append(Text(sample.host.line(), style="dim"))
            elif self.compact:
                if sample.simulated:  # simulated figures always say so, even one line per GPU
                    parts.append(Text("SIMULATED", style="bold yellow"))
                parts.extend(gpu_line(g) for g in sample.gpus)
            else:
                for gpu in sample.gpus:
                    parts.append(gpu_block(gpu, self.histories.get(gpu.nvml_index, []), width))
                    parts.append(Text(""))
        if self.placement_line and not self.compact:
            parts.append(Text(self.placement_line, style="magenta"))
        if self.estimate_lines and not self.compact:
            parts.append(Text("fine-tune estimate", style="bold underline"))
            parts.extend(self.estimate_lines)
        return _as_one_text(parts)
