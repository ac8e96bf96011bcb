"""Norm profiles: L2 norms of floating-point values added up per module.

- `norm_profile` (audit --stats): per repeated block (`layers.0`, `layers.1`...) its norm, and
  each parameter compared across the blocks built alike (`norm-outlier` findings).
- `children_norms` / `module_norms` (the explorer's module details pane, scripts): per child
  module (or, for a leaf module, per tensor) the norm of its values.

Statistics come from the value layer's streamed `stream_stats` (memory bounded by the chunk
size), kept by the caller in a dict (qualified name -> TensorStats) so a second profile, or a
profile of a parent, reads nothing twice. No Textual; numpy only while statistics are computed.
"""

from __future__ import annotations

import math
import re
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..checkpoint import (
    FLOATING_DTYPES,
    Checkpoint,
    ModuleNode,
    TensorRecord,
    block_index,
    dims_key,
)
from ..errors import MscopeError
from ..values.chunks import stats_supported

if TYPE_CHECKING:  # the explorer draws rows at first paint; computing imports the rest
    from ..values.data import TensorData
    from ..values.stats import ProgressFn, TensorStats
    from .findings import Finding

EIGHTHS = " ▏▎▍▌▋▊▉█"
OUTLIER_FACTOR = 10.0


_LAYER = re.compile(r"^(?P<container>.*?)\.(?P<index>\d+)\.(?P<role>.+)$")


def norm_profile(
    stats: Mapping[str, TensorStats], ckpt: Checkpoint
) -> tuple[list[dict[str, Any]], list[Finding]]:
    """Per repeated block (`transformer.h.0`, `layers.11`...) the L2 norm of its floating-point
    parameters, and each parameter compared across the blocks built alike (same names and
    shapes, so a Sequential's conv and BatchNorm are not compared): a norm more than
    OUTLIER_FACTOR from the median of at least 4 such blocks is a `norm-outlier` finding."""
    from .findings import finding

    containers: dict[str, dict[int, dict[str, tuple[float, int, tuple]]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for t in ckpt.tensors:
        if t.section != "" or t.alias_of is not None:
            continue
        st = stats.get(t.qualified_name)
        if st is None or t.dtype not in FLOATING_DTYPES:
            continue
        m = _LAYER.match(t.name)
        if m is None:
            continue
        index = block_index(m.group("index"))
        if index is None:
            continue
        containers[m.group("container")][index][m.group("role")] = (
            st.sumsq,
            st.numel,
            t.shape,
        )
    profile = []
    findings: list[Finding] = []
    for container, layers in containers.items():
        if len(layers) < 2:
            continue
        rows = []
        for index in sorted(layers):
            roles = layers[index]
            rows.append(
                {
                    "index": index,
                    "module": f"{container}.{index}",
                    "norm": math.sqrt(sum(v[0] for v in roles.values())),
                    "numel": sum(v[1] for v in roles.values()),
                }
            )
        groups: dict[frozenset, list[int]] = defaultdict(list)
        for index, roles in layers.items():
            groups[frozenset((r, dims_key(v[2])) for r, v in roles.items())].append(index)
        roles_out: dict[str, list[float]] = {}
        for signature, indices in groups.items():
            for role in sorted(r for r, _ in signature):
                values = [(i, math.sqrt(layers[i][role][0])) for i in sorted(indices)]
                if len(groups) == 1:
                    roles_out[role] = [v for _, v in values]
                if len(values) < 4:
                    continue
                ordered = sorted(v for _, v in values)
                median = ordered[len(ordered) // 2]
                if median <= 0:
                    continue
                for i, v in values:
                    if v > OUTLIER_FACTOR * median or v < median / OUTLIER_FACTOR:
                        name = f"{container}.{i}.{role}"
                        findings.append(
                            finding(
                                "norm-outlier",
                                f"{name}: L2 norm {v:.4g} is far from the median {median:.4g} of {role} "
                                f"over {len(values)} alike layers of {container}",
                                name,
                                norm=v,
                                median=median,
                            )
                        )
        profile.append({"container": container, "layers": rows, "roles": roles_out})
    return profile, findings


def children_norms(
    stats: Mapping[str, TensorStats], ckpt: Checkpoint, module: str
) -> list[dict[str, Any]]:
    """The norm profile of a module's children (explorer: a module's details pane).

    Returns one dict per child module or direct tensor: name, norm (sqrt of summed squares of the
    finite values), numel, and `complete` (every floating tensor under it has statistics).
    """
    node = find_module(ckpt, module)
    if node is None:
        return []
    rows = []
    for child in node.children.values():
        total = 0.0
        numel = 0
        complete = True
        for t in child.all_tensors():
            if t.dtype not in FLOATING_DTYPES or t.alias_of is not None:
                continue
            st = stats.get(t.qualified_name)
            if st is None:
                complete = False
                continue
            total += st.sumsq
            numel += st.numel
        rows.append(
            {"name": child.name, "norm": math.sqrt(total), "numel": numel, "complete": complete}
        )
    for t in node.tensors:
        st = stats.get(t.qualified_name)
        rows.append(
            {
                "name": t.name,
                "norm": st.norm if st else None,
                "numel": t.numel,
                "complete": st is not None,
            }
        )
    return rows


@dataclass(slots=True)
class NormRow:
    name: str  # full dotted name of the child module or tensor
    label: str  # its last part, as in the tree
    kind: str  # "module" or "tensor"
    norm: float | None  # sqrt of the summed squares of its finite values; None: no statistics
    numel: int
    complete: bool  # every floating-point tensor under it had statistics
    note: str = ""  # e.g. "tied to embed.weight"


def find_module(ckpt: Checkpoint, module: str) -> ModuleNode | None:
    node = ckpt.tree
    for part in module.split(".") if module else []:
        node = node.children.get(part)
        if node is None:
            return None
    return node


def profile_tensors(ckpt: Checkpoint, module: str) -> list[TensorRecord]:
    """The tensors whose statistics the profile of `module` needs: the floating-point tensors
    under its child modules (aliases once) and its own tensors."""
    node = find_module(ckpt, module)
    if node is None:
        return []
    out = [
        t
        for child in node.children.values()
        for t in child.all_tensors()
        if t.dtype in FLOATING_DTYPES and t.alias_of is None
    ]
    out += [t for t in node.tensors if stats_supported(t.dtype)]
    seen = {t.qualified_name for t in out}
    for child in node.children.values():  # tied children: the tensors they alias
        for t in child.all_tensors():
            if t.alias_of and t.dtype in FLOATING_DTYPES:
                target = ckpt.tensor(t.alias_of, t.section)
                if target is not None and target.qualified_name not in seen:
                    seen.add(target.qualified_name)
                    out.append(target)
    return out


def norm_rows(
    ckpt: Checkpoint, module: str, stats: MutableMapping[str, TensorStats]
) -> list[NormRow]:
    """The profile from the statistics at hand (rows not `complete` where some are missing).

    A child whose floating-point tensors all alias others (tied weights: `lm_head` sharing the
    embedding's storage) takes the norm of the tensors it is tied to, with a note saying so."""
    node = find_module(ckpt, module)
    if node is None:
        return []
    modules = {c.name: c for c in node.children.values()}
    rows = []
    for r in children_norms(stats, ckpt, module):
        row = NormRow(
            r["name"],
            r["name"].rsplit(".", 1)[-1],
            "module" if r["name"] in modules else "tensor",
            r["norm"],
            r["numel"],
            r["complete"],
        )
        child = modules.get(r["name"])
        if child is not None and r["numel"] == 0:
            tied = [t for t in child.all_tensors() if t.dtype in FLOATING_DTYPES and t.alias_of]
            if tied:
                found = [stats.get(_qualified(t.section, t.alias_of)) for t in tied]
                row.complete = all(st is not None for st in found)
                row.norm = math.sqrt(sum(st.sumsq for st in found if st is not None))
                row.numel = sum(t.numel for t in tied)
                row.note = "tied to " + ", ".join(sorted({t.alias_of for t in tied}))
            else:
                row.norm = None  # nothing floating-point under it
        rows.append(row)
    # Numbered blocks (layers.0, layers.1, ..., layers.10) in layer order, not file/name order.
    numbered = [r for r in rows if r.kind == "module" and r.label.isdigit()]
    if numbered and len(numbered) == sum(r.kind == "module" for r in rows):
        numbered.sort(key=lambda r: int(r.label))
        rows = numbered + [r for r in rows if r.kind != "module"]
    return rows


def _qualified(section: str, name: str) -> str:
    return f"{section}/{name}" if section else name


def module_norms(
    ckpt: Checkpoint,
    module: str,
    stats: MutableMapping[str, TensorStats] | None = None,
    data: TensorData | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    errors: MutableMapping[str, str] | None = None,
    on_stats: Callable[[TensorRecord, TensorStats], None] | None = None,
    threads: int | None = None,
) -> list[NormRow]:
    """The norm profile of `module`'s children ("" is the model), computing the statistics it
    lacks with `stream_stats` and adding them to `stats` (and, one by one, to `on_stats`).

    Tensors whose bytes cannot be read go to `errors` (name -> message) and are skipped next time.
    Raises Cancelled when `cancel` is set (what was computed is kept in `stats`).
    """
    stats = {} if stats is None else stats
    errors = {} if errors is None else errors
    todo = [
        t
        for t in profile_tensors(ckpt, module)
        if t.qualified_name not in stats and t.qualified_name not in errors
    ]
    if todo:
        from ..values.data import TensorData
        from ..values.stream import stream_stats

        def failed(record: TensorRecord, exc: MscopeError) -> None:
            errors[record.qualified_name] = exc.message

        own = data is None
        source = TensorData() if own else data
        try:
            for record, st in stream_stats(
                source, todo, progress=progress, cancel=cancel, on_error=failed, threads=threads
            ):
                stats[record.qualified_name] = st
                if on_stats is not None:
                    on_stats(record, st)
        finally:
            if own:
                source.close()
    return norm_rows(ckpt, module, stats)


def bar(value: float, top: float, width: int) -> str:
    """A horizontal bar of `width` cells for value/top, in eighths of a cell."""
    if top <= 0 or value <= 0 or width <= 0:
        return ""
    eighths = round(min(1.0, value / top) * width * 8)
    full, rest = divmod(eighths, 8)
    return "█" * full + (EIGHTHS[rest] if rest else "")


def format_profile(rows: list[NormRow], width: int = 60, limit: int = 40) -> list[str]:
    """Plain-text bar chart of a profile: name, bar, norm (for scripts and logs)."""
    shown = rows[:limit]
    top = max((r.norm for r in shown if r.norm is not None), default=0.0)
    name_w = min(24, max((len(r.label) for r in shown), default=4))
    bar_w = max(4, width - name_w - 12)
    lines = []
    for r in shown:
        value = "-" if r.norm is None else f"{r.norm:.4g}"
        mark = ("" if r.complete else "…") + (f" ({r.note})" if r.note else "")
        lines.append(
            f"{r.label[:name_w]:<{name_w}} {bar(r.norm or 0.0, top, bar_w):<{bar_w}} {value}{mark}"
        )
    if len(rows) > limit:
        lines.append(f"… {len(rows) - limit:,} more")
    return lines
