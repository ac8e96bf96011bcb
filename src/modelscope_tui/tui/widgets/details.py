"""What the details pane shows for a module, a tensor, or the file itself (rich renderables)."""

from __future__ import annotations

from bisect import bisect_right

from rich.cells import cell_len, get_character_cell_size
from rich.console import Group, RenderableType
from rich.text import Text

from ...checkpoint import ModuleNode, TensorRecord
from ...readers import FORMAT_LABELS
from ...readers.gguf import fact_lines
from ...readers.peft import fact_lines as adapter_fact_lines
from ...summary import optimizer_summaries
from ...training.session import Session
from ...units import fmt_bytes, fmt_count, percent, safe_text, sparkline

MAX_ENTRIES = 60


LABEL_MAX = 20  # "saved requires_grad"; longer labels (entry paths) go on a line of their own
LABEL_MIN = 13  # "requires_grad", "out_channels": kept beside their values in a narrow pane
VALUE_INDENT = 2  # a value under its label


class Fields:
    """Label / value rows, each value beside its label when it fits, else on lines of its own
    under the label. Long values wrap where a reader would break them: at spaces, and after
    the dots, slashes and underscores of names and paths (`torch.nn.modules.container.` /
    `Sequential`), never inside a word or a number (rich's folding cut `conta` / `iner`)."""

    def __init__(self) -> None:
        self.rows: list[tuple[Text, Text]] = []

    def add_row(self, label: str | Text, value: str | Text | RenderableType = "") -> None:
        """Plain strings here hold names, keys and values from the file: shown as text (never
        rich markup, so `[bold]` in a name stays literal) with unsafe characters escaped."""
        label, value = _cell(label), _cell(value)
        if not isinstance(value, Text):
            raise TypeError(f"a details value is text, not {type(value).__name__}")
        label = label.copy()
        label.stylize("bold")
        self.rows.append((label, value))

    def __rich_console__(self, console, options):
        width = max(8, options.max_width)
        cap = min(LABEL_MAX, max(LABEL_MIN, width // 2))
        label_w = max((label.cell_len for label, _ in self.rows if label.cell_len <= cap), default=0)
        indent = label_w + 1  # where the value of the row above began
        for label, value in self.rows:
            lines = value.split("\n", allow_blank=True) if "\n" in value.plain else [value]
            if label.plain:
                beside = label.cell_len <= label_w and all(line.cell_len < width - label_w for line in lines)
                if beside:
                    indent = label_w + 1
                    first = label.copy()
                    first.pad_right(indent - label.cell_len)
                    yield first + lines[0]
                    lines = lines[1:]
                else:
                    yield from wrap(label, width)
                    indent = VALUE_INDENT
            # the value's (other) lines; a row without a label continues the value above
            for line in lines:
                for piece in wrap(line, width - indent):
                    yield Text(" " * indent) + piece


# Where a line may end, best first: after a space; after a slash or comma; after a dot; after
# an underscore, dash or colon; last, after the space that joins a number to its unit. Dots and
# the rest only before a letter: `conv.Conv2d` may break, a number (`0.0095006538`) never does.
BREAKS = (" ", "/,;", ".", "_-:")
UNIT_BREAK = len(BREAKS)  # `60 B`, `33 elements`: kept together unless nothing else fits
UNIT_MAX = 10


def _break_rank(plain: str, k: int) -> int | None:
    """The rank of a break after plain[k] (lower is better), or None where a line may not end."""
    c = plain[k]
    if c == " " and k and plain[k - 1].isdigit():
        unit = plain[k + 1 :].split(" ", 1)[0]
        if unit[:1].isalpha() and len(unit.rstrip(",;)")) <= UNIT_MAX:
            return UNIT_BREAK
    for rank, chars in enumerate(BREAKS):
        if c in chars:
            if rank < 2 or (k + 1 < len(plain) and plain[k + 1].isalpha()):
                return rank
            return None
    return None


def _cut(plain: str, start: int, width: int, pos: list[int]) -> int:
    """Where the line that begins at `start` ends: at the best kind of boundary that still
    fills half the line, else the last boundary of any kind, else at `width` (no boundary).
    Widths are terminal cells (pos[i]: cells before plain[i]); a CJK character or an emoji
    takes two, so a line of them holds half as many characters."""
    end = bisect_right(pos, pos[start] + width, lo=start) - 1  # the most characters that fit
    end = max(end, start + 1)  # a character wider than the line still makes progress
    found: dict[int, int] = {}  # rank -> the last cut of that rank
    for k in range(end - 1, start, -1):
        rank = _break_rank(plain, k)
        if rank is not None and rank not in found:
            found[rank] = k + 1
    for rank in sorted(found):
        if pos[found[rank]] - pos[start] >= width // 2:
            return found[rank]
    usual = [cut for rank, cut in found.items() if rank != UNIT_BREAK]
    return max(usual or found.values(), default=end)


def wrap(text: Text, width: int) -> list[Text]:
    """`text` in lines of at most `width` cells, broken at boundaries (BREAKS); a hard break
    only inside a run with none. Styles are kept."""
    plain = text.plain
    if width < 1 or cell_len(plain) <= width:
        return [text]
    pos = [0]
    for c in plain:
        pos.append(pos[-1] + get_character_cell_size(c))
    offsets = []
    start, n = 0, len(plain)
    while pos[n] - pos[start] > width:
        start = _cut(plain, start, width, pos)
        while start < n - 1 and plain[start] == " ":  # no line starts with a space
            start += 1
        offsets.append(start)
    lines = []
    for piece in text.divide(offsets):
        piece.rstrip_end(width)  # the space a line ends at stays: copied text reads as it was
        if piece.plain:
            lines.append(piece)
    return lines


def _cell(cell):
    if isinstance(cell, str):
        return Text(safe_text(cell))
    if isinstance(cell, Text):
        return _safe_rich_text(cell)
    return cell


def _safe_rich_text(text: Text) -> Text:
    """A Text whose characters are safe (styles kept when nothing needed escaping)."""
    if text.plain.isprintable() or safe_text(text.plain, multiline=True) == text.plain:
        return text
    return Text(safe_text(text.plain, multiline=True), style=text.style)


def _table() -> Fields:
    return Fields()


def tensor_details(session: Session, t: TensorRecord, device: str | None = None, values: RenderableType | None = None) -> RenderableType:
    table = _table()
    table.add_row("tensor", t.name)
    table.add_row("kind", t.kind + ("" if t.kind_from_file else " (from name)"))
    table.add_row("shape", str(list(t.shape)))
    table.add_row("dtype", t.dtype)
    if session.can_train(t.name):
        state = "trainable" if session.is_trainable(t.name) else "frozen"
    elif t.name in session.lora_targets:
        state = "LoRA target (the quantized base stays frozen)" if session.is_lora_target(t.name) else "frozen (quantized; unfreeze to make it a LoRA target)"
    else:
        state = "cannot require grad" if t.kind == "parameter" or t.alias_of is None else "tied"
    table.add_row("now", state)
    if device is not None:
        table.add_row("device", device)
    table.add_row("saved requires_grad", str(t.requires_grad))
    table.add_row("numel", f"{t.numel:,}")
    table.add_row("bytes", bytes_text(t.nbytes))
    table.add_row("stride", str(list(t.stride)))
    table.add_row("contiguous", "yes" if t.is_contiguous else "no")
    table.add_row("storage offset", f"{t.storage_offset:,}")
    if t.storage is not None:
        s = t.storage
        table.add_row("storage", f"{s.key} ({s.dtype}, {fmt_bytes(s.nbytes)})")
        table.add_row("stored on", s.location)
        if s.data_offset is not None:
            table.add_row("file offset", f"{s.data_offset:,}")
    if t.shard:
        table.add_row("shard", t.shard)
    if t.alias_of:
        table.add_row("tied to", f"{t.alias_of} (same storage and view; counted once)")
    elif t.tied_to:
        table.add_row("shares storage", t.tied_to)
    if not t.persistent:
        table.add_row("persistent", "no (not in state_dict)")
    if t.note:
        table.add_row("note", t.note)
    if t.quant is not None:
        q = t.quant
        table.add_row("quantized", f"{q.scheme} ({q.method}): a frozen base, adapters train on it")
        table.add_row("logical weight", f"{q.logical_name} {list(q.logical_shape)}")
        table.add_row("logical params", f"{q.logical_numel:,}")
        table.add_row("real bytes", f"{fmt_bytes(q.nbytes)} ({q.nbytes:,}, {8 * q.nbytes / max(q.logical_numel, 1):.2f} bits/param)")
        table.add_row("companions", ", ".join(n.rsplit(".", 1)[-1] for n in q.companions) or "none")
    if t.companion_of is not None:
        table.add_row("companion of", f"{t.companion_of} (quantized weight; never trains)")
    if values is not None:
        return Group(table, Text("\nvalues", style="bold underline"), values)
    return table


HIST_BARS = " ▁▂▃▄▅▆▇█"


def stats_details(stats, histogram=None) -> RenderableType:
    """Value statistics and a one-line histogram (computed by the audit module)."""
    table = _table()
    if stats is None:
        table.add_row("values", Text("computing…", style="dim"))
        return table
    if isinstance(stats, str):
        table.add_row("values", Text(stats, style="yellow"))
        return table

    def g(x) -> str:
        return "-" if x is None else f"{x:.6g}"

    table.add_row("min / max", f"{g(stats.min)} / {g(stats.max)}")
    table.add_row("mean / std", f"{g(stats.mean)} / {g(stats.std)}")
    table.add_row("L2 norm", g(stats.norm))
    table.add_row("zeros", f"{stats.zero_fraction:.1%}")
    if stats.nan or stats.inf:
        table.add_row("NaN / Inf", Text(f"{stats.nan:,} / {stats.inf:,}", style="bold red"))
    if stats.flags:
        table.add_row("flags", Text(", ".join(stats.flags), style="yellow"))
    if histogram is not None and histogram.counts and max(histogram.counts):
        top = max(histogram.counts)
        bars = "".join(HIST_BARS[min(8, round(c / top * 8))] if c else " " for c in histogram.counts)
        table.add_row("histogram", Text(bars, style="green"))
        table.add_row("", Text(f"{histogram.lo:.3g} … {histogram.hi:.3g}", style="dim"))
    return table


def count_text(n: int) -> str:
    """`1,594 (1.6K)`, or `676` where the short form would only repeat it."""
    short = fmt_count(n)
    return f"{n:,}" if short == str(n) else f"{n:,} ({short})"


def bytes_text(n: int) -> str:
    """`2.6 KB (2,704)`, or `528 B` where the exact count would only repeat it."""
    return fmt_bytes(n) if n < 1024 else f"{fmt_bytes(n)} ({n:,})"


def module_details(session: Session, m: ModuleNode, profile: RenderableType | None = None) -> RenderableType:
    table = _table()
    stats = m.stats
    table.add_row("module", m.name or "(root)")
    if m.class_path:
        table.add_row("class", m.class_path)
    if m.training is not None:
        table.add_row("training", str(m.training))
    state = session.node_state(m)
    trainable = session.trainable_in(m)
    table.add_row("params", count_text(stats.params))
    if state:
        # `32 (all)`, not `32 (trainable)` beside the label that already says it
        table.add_row("trainable", f"{trainable:,} ({'all' if state == 'trainable' else state})")
    chosen, quantized = session.lora_target_count(m) if session.lora_targets else (0, 0)
    if chosen:
        table.add_row("LoRA targets", f"{chosen} of {quantized} quantized weight(s)")
    table.add_row("buffers", f"{stats.buffers:,} elements")
    table.add_row("tensors", f"{stats.tensors:,}")
    table.add_row("bytes", bytes_text(stats.nbytes))
    parts: list[RenderableType] = [table]
    if profile is not None:
        parts.append(profile)
    if m.attributes:
        attrs = _table()
        for key, value in list(m.attributes.items())[:40]:
            attrs.add_row(str(key), _short(value))
        parts += [Text("\nattributes", style="bold underline"), attrs]
    if m.name in session.eval_modules:
        parts.append(Text("\neval mode recorded in the plan", style="green"))
    elif m.name in session.frozen_norm_layers():
        parts.append(
            Text(
                "\nfrozen, but running statistics still update in train mode (press b to record eval mode)",
                style="yellow",
            )
        )
    return Group(*parts)


def file_details(session: Session) -> RenderableType:
    ckpt = session.ckpt
    totals = ckpt.totals()
    table = _table()
    table.add_row("file", str(ckpt.path))
    table.add_row("format", FORMAT_LABELS.get(ckpt.format, ckpt.format))
    table.add_row("kind", ckpt.kind.replace("_", " "))
    if ckpt.model_path:
        table.add_row("model at", ckpt.model_path)
    table.add_row("hierarchy", "from the file" if ckpt.has_real_hierarchy else "implied by names")
    trainable, total = session.totals()
    table.add_row("params", f"{total:,}")
    table.add_row("trainable", f"{trainable:,} ({percent(trainable, total)})")
    table.add_row("stored on", ", ".join(f"{k} {fmt_bytes(v)}" for k, v in totals.bytes_by_location.items()) or "-")
    table.add_row("dtypes", ", ".join(f"{k} {fmt_bytes(v)}" for k, v in totals.bytes_by_dtype.items()) or "-")
    parts: list[RenderableType] = [table]
    other = {k: v for k, v in ckpt.sections.items() if v != "model" and k in totals.sections}
    optimizers = optimizer_summaries(ckpt)
    if other:
        sec = _table()
        for name, role in other.items():
            info = totals.sections[name]
            sec.add_row(name, f"{role}: {info['tensors']:,} tensors, {fmt_bytes(info['bytes'])}")
            if name in optimizers:
                sec.add_row("", optimizers[name])
        parts += [Text("\nother sections", style="bold underline"), sec]
    gguf_rows = fact_lines(ckpt)
    if gguf_rows:
        facts = _table()
        for label, value in gguf_rows:
            facts.add_row(label, value)
        parts += [Text("\nGGUF", style="bold underline"), facts]
    peft_rows = adapter_fact_lines(ckpt)
    if peft_rows:
        facts = _table()
        for label, value in peft_rows:
            facts.add_row(label, value)
        parts += [Text("\nPEFT adapter", style="bold underline"), facts]
    if ckpt.entries:
        entries = _table()
        for e in ckpt.entries[:MAX_ENTRIES]:
            entries.add_row(e.path, _short(e.value))
        if len(ckpt.entries) > MAX_ENTRIES:
            entries.add_row("…", f"{len(ckpt.entries) - MAX_ENTRIES:,} more (mscope summary --json)")
        parts += [Text("\nentries", style="bold underline"), entries]
    unsafe = ckpt.unsafe_globals
    if unsafe:
        g_table = _table()
        for g in unsafe[:30]:
            style = "bold red" if g.safety == "dangerous" else "yellow"
            g_table.add_row(Text(g.safety, style=style), g.qualname)
            for call in g.calls:
                g_table.add_row("", Text(f"would call {safe_text(call)}", style="red"))
        parts += [Text("\nglobals outside the weights_only allowlist", style="bold underline"), g_table]
    for w in ckpt.refusals + ckpt.warnings:
        parts.append(Text(f"warning: {safe_text(w)}", style="yellow"))
    return Group(*parts)


def _short(value: object, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- norm profile ------------------------------------------------------------------------------
PROFILE_ROWS = 24
PROFILE_BAR = 14  # the bars' width when the pane has room; they narrow first when it has not
PROFILE_LABEL = 18  # a child's name keeps up to this, at least PROFILE_LABEL_MIN cells of it
PROFILE_LABEL_MIN = 8
PROFILE_BAR_MIN = 3  # narrower than this, the bars go and the figures stay


def norm_profile_details(rows, status: str | None = None) -> RenderableType:
    """A module's children as horizontal bars of their L2 norm (rows from norms.module_norms).

    status: a progress or error line while the profile is incomplete."""
    parts: list[RenderableType] = [Text("\nnorm profile (L2 of each child)", style="bold underline")]
    if not rows:
        parts.append(Text(status or "no floating-point tensors", style="dim"))
        return Group(*parts)
    if status:
        parts.append(Text(status, style="dim"))
    if len(rows) > 8 and any(r.norm is not None for r in rows):
        parts.append(ProfileSparkline([r.norm or 0.0 for r in rows]))
    parts.append(ProfileRows(rows[:PROFILE_ROWS], max((r.norm for r in rows if r.norm is not None), default=0.0)))
    if len(rows) > PROFILE_ROWS:
        parts.append(Text(f"… {len(rows) - PROFILE_ROWS:,} more children", style="dim"))
    return Group(*parts)


class ProfileSparkline:
    """Every child's norm, one bar each when the pane is wide enough; else each bar the largest
    of a run of neighbours (a spike stays visible), and a line says how many a bar stands for.
    Drawn for the width it gets: cut at the pane's edge, the last children were lost."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def __rich_console__(self, console, options):
        width = max(1, options.max_width)
        values, n = self.values, len(self.values)
        if n <= width:
            yield Text(sparkline(values, floor=True), style="green")
            return
        bars = [max(values[i * n // width : (i + 1) * n // width]) for i in range(width)]
        yield Text(sparkline(bars, top=max(values), floor=True), style="green")
        yield from wrap(Text(f"a bar: the largest of {-(-n // width)} children", style="dim"), width)


class ProfileRows:
    """One line per child: its name, a bar, its norm, fitted to the pane's width. The figure is
    never cut; the name keeps PROFILE_LABEL_MIN cells, the bars PROFILE_BAR_MIN (or they go);
    what is left lengthens the name, then the bars."""

    def __init__(self, rows, top: float) -> None:
        self.rows = rows
        self.top = top

    def widths(self, width: int, label_full: int, value_w: int) -> tuple[int, int]:
        """(name cells, bar cells; 0: no bars) for a pane `width` cells wide."""
        room = width - value_w - 2  # a space after the name and one before the figure
        label = min(label_full, PROFILE_LABEL_MIN)
        if room - label < PROFILE_BAR_MIN:
            return max(1, room + 1), 0
        label = min(label_full, room - PROFILE_BAR_MIN)
        return label, min(PROFILE_BAR, room - label)

    def __rich_console__(self, console, options):
        from ...audit.norms import bar

        lines = [(self._label(r), self._value(r), r) for r in self.rows]
        value_w = max(v.cell_len for _, v, _ in lines)
        label_full = min(PROFILE_LABEL, max(label.cell_len for label, _, _ in lines))
        label_w, bar_w = self.widths(max(8, options.max_width), label_full, value_w)
        for label, value, r in lines:
            label.truncate(label_w, overflow="ellipsis", pad=True)
            line = label + Text(" ")
            if bar_w:
                drawn = bar(r.norm, self.top, bar_w) if r.norm is not None else ""
                line.append(drawn.ljust(bar_w), style="green" if r.complete else "dim green")
                line.append(" ")
            line.append(" " * (value_w - value.cell_len))
            yield line + value

    @staticmethod
    def _label(r) -> Text:
        label = Text(safe_text(r.label), style="bold" if r.kind == "module" else "")
        if r.note:
            label.append(" (tied)", style="magenta")
        return label

    @staticmethod
    def _value(r) -> Text:
        if r.norm is None:
            return Text("-" if r.complete else "…", style="dim")
        if not r.complete:
            return Text(f"{r.norm:.4g}…" if r.norm else "…", style="dim")
        return Text(f"{r.norm:.4g}")


# -- diff mode ---------------------------------------------------------------------------------
def _g(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _status_text(status: str) -> Text:
    from .tree import DIFF_MARKS

    mark, style, word = DIFF_MARKS.get(status, ("?", "", status))
    return Text("… comparing values" if status == "pending" else f"{mark} {word}", style=style)


def diff_tensor_details(d, live) -> RenderableType:
    """What changed in one tensor between A and B: status, names, shapes, dtypes, figures."""
    from ...diff.report import ADDED, CHANGED, CLOSE, PENDING, REMOVED

    table = _table()
    if d is None:
        table.add_row("change", Text("not compared", style="dim"))
        return Group(Text("diff vs A", style="bold underline"), table)
    table.add_row("change", _status_text(d.status))
    if d.pending and d.status != PENDING:
        table.add_row("", Text("comparing values…", style="dim"))
    if d.a_name and d.b_name and d.a_name != d.b_name:
        table.add_row("name in A", d.a_name)
        table.add_row("name in B", d.b_name)
    if d.status == ADDED:
        table.add_row("", Text("only in B (this file)", style="blue"))
    elif d.status == REMOVED:
        table.add_row("", Text("only in A; not in this file", style="red"))
    if d.a_shape is not None and d.b_shape is not None and d.a_shape != d.b_shape:
        table.add_row("shape", f"{list(d.a_shape)} → {list(d.b_shape)}")
    if d.a_dtype and d.b_dtype and d.a_dtype != d.b_dtype:
        table.add_row("dtype", f"{d.a_dtype} → {d.b_dtype}")
    if d.grad_changed:
        from ...diff.report import grad_word

        table.add_row(
            "requires_grad",
            Text(f"{grad_word(d.a_requires_grad)} → {grad_word(d.b_requires_grad)}", style="yellow"),
        )
    if d.max_abs is not None:
        table.add_row("max |Δ|", _g(d.max_abs))
        table.add_row("rel. L2 Δ", _g(d.rel_l2))  # ||a - b|| / ||a||
        table.add_row("cosine", _g(d.cosine, 8))
        if d.mismatched is not None and d.numel:
            table.add_row(
                "outside tol.",
                f"{d.mismatched:,} of {d.numel:,} ({d.mismatched / d.numel:.1%})",
            )
        if d.status in (CLOSE, CHANGED):
            table.add_row("tolerance", Text(f"atol {live.atol:g}, rtol {live.rtol:g}", style="dim"))
    if d.message:
        table.add_row("note", d.message)
    return Group(Text("diff vs A", style="bold underline"), table)


def diff_module_details(m, live) -> RenderableType:
    """A module's aggregate in diff mode: how many of its tensors changed, and how much."""
    from ...diff.report import IDENTICAL, PENDING

    table = _table()
    table.add_row("change", _status_text(m.status))
    table.add_row("tensors", f"{m.moved:,} of {m.tensors:,} differ" if m.tensors else "none")
    counts = Text()
    for status, n in sorted(m.counts.items(), key=lambda kv: (kv[0] == IDENTICAL, kv[0] == PENDING, kv[0])):
        if n:
            if counts:
                counts.append(" · ")
            counts.append(f"{n:,} {status}", style=_status_text(status).style)
    if counts:
        table.add_row("", counts)
    if m.rel_l2 is not None and m.sumsq_diff:
        table.add_row("rel. L2 Δ", _g(m.rel_l2))
    if m.max_abs:
        table.add_row("max |Δ|", _g(m.max_abs))
    if m.pending:
        table.add_row("pending", Text(f"{m.pending:,} tensor(s) still being compared", style="dim"))
    return Group(Text("diff vs A", style="bold underline"), table)


def diff_file_details(live, plan_lines: list[str] | None = None) -> RenderableType:
    """The root in diff mode: both files, tolerances, the summary and the freeze-plan check."""
    table = _table()
    table.add_row("A (before)", f"{live.a.path} ({FORMAT_LABELS.get(live.a.format, live.a.format)})")
    table.add_row("B (this)", f"{live.b.path} ({FORMAT_LABELS.get(live.b.format, live.b.format)})")
    table.add_row("tolerance", f"atol {live.atol:g}, rtol {live.rtol:g}")
    summary = Text()
    for status, n in live.summary():
        if summary:
            summary.append("\n")
        summary.append(f"{n:,} {status}", style=_status_text(status).style)
    table.add_row("tensors", summary)
    if live.cancelled:
        table.add_row("", Text(f"cancelled: {live.pending:,} not compared (v compares again)", style="yellow"))
    if live.grad_changed:
        from ...diff.report import grad_word

        grads = Text(f"{len(live.grad_changed):,} changed", style="yellow")
        for name, d in list(live.grad_changed.items())[:5]:
            grads.append(f"\n{safe_text(name)}: {grad_word(d.a_requires_grad)} → {grad_word(d.b_requires_grad)}")
        if len(live.grad_changed) > 5:
            grads.append(f"\n… {len(live.grad_changed) - 5:,} more", style="dim")
        table.add_row("requires_grad", grads)
    parts: list[RenderableType] = [Text("diff", style="bold underline"), table]
    for note in live.notes:
        parts.append(Text(safe_text(note), style="dim"))
    for line in plan_lines or []:
        parts.append(Text(safe_text(line), style="green" if "bit-identical in B" in line else "yellow"))
    return Group(*parts)


def ghost_details(row, live) -> RenderableType:
    """A tensor or module that only A has (removed, or renamed away)."""
    if row.tensor is not None:
        t = row.tensor
        table = _table()
        table.add_row("tensor", t.name)
        table.add_row("shape", str(list(t.shape)))
        table.add_row("dtype", t.dtype)
        table.add_row("numel", f"{t.numel:,}")
        table.add_row("bytes", bytes_text(t.nbytes))
        d = live.a_tensor(t.name)
        return Group(table, Text(""), diff_tensor_details(d, live))
    m = row.module
    table = _table()
    table.add_row("module", m.name)
    table.add_row("in", Text("A only (not in this file)", style="red"))
    if m.class_path:
        table.add_row("class", m.class_path)
    return Group(table, Text(""), diff_module_details(live.module(m.name), live))
