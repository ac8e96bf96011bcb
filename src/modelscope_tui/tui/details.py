"""What the details pane shows for a module, a tensor, or the file itself (rich renderables)."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ..checkpoint import ModuleNode, TensorRecord
from ..readers import FORMAT_LABELS
from ..session import Session
from ..summary import optimizer_summaries
from ..units import fmt_bytes, fmt_count

MAX_ENTRIES = 60


def _table() -> Table:
    table = Table.grid(padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    return table


def tensor_details(session: Session, t: TensorRecord, device: str | None = None, values: RenderableType | None = None) -> RenderableType:
    table = _table()
    table.add_row("tensor", t.name)
    table.add_row("kind", t.kind + ("" if t.kind_from_file else " (from name)"))
    table.add_row("shape", str(list(t.shape)))
    table.add_row("dtype", t.dtype)
    if session.can_train(t.name):
        state = "trainable" if session.is_trainable(t.name) else "frozen"
    else:
        state = "cannot require grad" if t.kind == "parameter" or t.alias_of is None else "tied"
    table.add_row("now", state)
    if device is not None:
        table.add_row("device", device)
    table.add_row("saved requires_grad", str(t.requires_grad))
    table.add_row("numel", f"{t.numel:,}")
    table.add_row("bytes", f"{fmt_bytes(t.nbytes)} ({t.nbytes:,})")
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


def module_details(session: Session, m: ModuleNode) -> RenderableType:
    table = _table()
    stats = m.stats
    table.add_row("module", m.name or "(root)")
    if m.class_path:
        table.add_row("class", m.class_path)
    if m.training is not None:
        table.add_row("training", str(m.training))
    state = session.node_state(m)
    trainable = session.trainable_in(m)
    table.add_row("params", f"{stats.params:,} ({fmt_count(stats.params)})")
    if state:
        table.add_row("trainable", f"{trainable:,} ({state})")
    table.add_row("buffers", f"{stats.buffers:,} elements")
    table.add_row("tensors", f"{stats.tensors:,}")
    table.add_row("bytes", fmt_bytes(stats.nbytes))
    parts: list[RenderableType] = [table]
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
                g_table.add_row("", Text(f"would call {call}", style="red"))
        parts += [Text("\nglobals outside the weights_only allowlist", style="bold underline"), g_table]
    for w in ckpt.warnings:
        parts.append(Text(f"warning: {w}", style="yellow"))
    return Group(*parts)


def _short(value: object, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
