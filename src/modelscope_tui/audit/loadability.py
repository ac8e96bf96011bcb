"""Load-ability: what torch.load(weights_only=True) would do with the file (dangerous and unsafe
globals, with the add_safe_globals line for the safe ones), how the format loads at all, devices
that need map_location, and tensors stored without values. Metadata only.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..checkpoint import Checkpoint, Format
from ..units import fmt_bytes
from .checks import AuditRun, Check
from .findings import Finding, finding

if TYPE_CHECKING:
    from .findings import AuditReport


def add_safe_globals_line(globals_: Iterable[Any]) -> str | None:
    """`import m; torch.serialization.add_safe_globals([m.Name, ...])` for unsafe, non-dangerous
    globals. Classes from `__main__` are named bare: they come from your own script."""
    names = []
    modules = []
    for g in globals_:
        if g.safety != "unsafe":
            continue
        if g.module in ("__main__", "__mp_main__"):
            names.append(g.name)
            continue
        names.append(f"{g.module}.{g.name}")
        if g.module not in modules:
            modules.append(g.module)
    if not names:
        return None
    imports = f"import {', '.join(['torch', *modules])}; " if modules else "import torch; "
    return f"{imports}torch.serialization.add_safe_globals([{', '.join(names)}])"


def dangerous_findings(dangerous: Iterable[Any]) -> list[Finding]:
    """One `dangerous-global` finding per dangerous global: what it is, why (the pickle calls it,
    tampers with it, or it is known to run code), and the call it would make."""
    out = []
    for g in dangerous:
        calls = f"; would call {g.calls[0]}" if g.calls else ""
        out.append(
            finding(
                "dangerous-global",
                f"DANGEROUS global {g.qualname} ({g.reason}){calls}: never torch.load this file "
                "with weights_only=False",
                module=g.module,
                name=g.name,
                calls=list(g.calls),
                pickle=g.pickle,
            )
        )
    return out


def check_loadability(ckpt: Checkpoint) -> tuple[list[Finding], dict[str, Any]]:
    out: list[Finding] = []
    info: dict[str, Any] = {}
    pickled = ckpt.format in (
        Format.TORCH_ZIP,
        Format.TORCH_LEGACY,
        Format.PICKLE,
        Format.TORCHSCRIPT,
        Format.SHARDED_TORCH,
        Format.DCP,
    )
    dangerous = [g for g in ckpt.globals if g.safety == "dangerous"]
    unsafe = [g for g in ckpt.globals if g.safety == "unsafe"]
    out.extend(dangerous_findings(dangerous))
    line = add_safe_globals_line(unsafe)
    if unsafe:
        functions = [g.qualname for g in unsafe if not g.name[:1].isupper()]
        fn_note = (
            f"; {', '.join(functions[:3])} {'is a function' if len(functions) == 1 else 'are functions'}: "
            "allowlisting lets the file call it, so only do it for a file you trust"
            if functions
            else ""
        )
        names = ", ".join(g.qualname for g in unsafe[:6]) + (
            f" and {len(unsafe) - 6} more" if len(unsafe) > 6 else ""
        )
        out.append(
            finding(
                "unsafe-global",
                f"torch.load(weights_only=True) rejects {len(unsafe)} global(s): {names}"
                + (
                    "; torch.serialization.add_safe_globals can allow them (the line is printed below)"
                    if line and not dangerous
                    else ""
                )
                + fn_note,
                globals=[g.qualname for g in unsafe],
                add_safe_globals=line,
            )
        )
    if ckpt.format == Format.TORCHSCRIPT:
        out.append(
            finding(
                "torchscript",
                "TorchScript archive: torch.load hands it to torch.jit.load, which runs the archive's "
                "code; load it only if you trust it",
            )
        )
    elif ckpt.format in (Format.SAFETENSORS, Format.SHARDED_SAFETENSORS):
        out.append(
            finding("not-torch-load", "safetensors: no pickle, nothing can run when it loads")
        )
    elif ckpt.format == Format.DCP:
        out.append(
            finding("not-torch-load", "DCP directory: load with torch.distributed.checkpoint.load")
        )
    elif ckpt.format == Format.PICKLE:
        out.append(
            finding(
                "not-torch-load", "a plain pickle, not a torch.save file: torch.load cannot read it"
            )
        )

    by_loc: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t in ckpt.tensors:
        if t.storage is None or t.alias_of is not None:
            continue
        v = by_loc[t.location]
        v[0] += 1
        v[1] += t.nbytes
    accel = {k: v for k, v in by_loc.items() if not k.startswith("cpu")}
    if accel:
        where = ", ".join(
            f"{k} ({v[0]} tensors, {fmt_bytes(v[1])})" for k, v in sorted(accel.items())
        )
        out.append(
            finding(
                "map-location",
                f"tensors were saved on {where}: on a machine without "
                f"{'that device' if len(accel) == 1 else 'those devices'} load with "
                "torch.load(F, map_location='cpu') (or map them to the GPUs you have)",
                locations={k: {"tensors": v[0], "bytes": v[1]} for k, v in accel.items()},
            )
        )
    nodata = [t for t in ckpt.tensors if t.storage is None and t.alias_of is None]
    if nodata:
        kinds = Counter(t.note or "no storage" for t in nodata)
        out.append(
            finding(
                "no-data",
                f"{len(nodata)} tensor(s) have no stored values ("
                + ", ".join(f"{k}: {v}" for k, v in kinds.most_common(4))
                + f"), e.g. {nodata[0].qualified_name}",
                nodata[0].qualified_name,
                count=len(nodata),
            )
        )
    info.update(
        {
            "pickle": pickled,
            "weights_only": (not unsafe and not dangerous and ckpt.format != Format.TORCHSCRIPT)
            if pickled
            else None,
            "dangerous_globals": [g.qualname for g in dangerous],
            "unsafe_globals": [g.qualname for g in unsafe],
            "add_safe_globals": line,
            "locations": {k: {"tensors": v[0], "bytes": v[1]} for k, v in sorted(by_loc.items())},
            "map_location": "cpu" if accel else None,
        }
    )
    return out, info


class Loadability(Check):
    order = 20

    def run(self, run: AuditRun, report: AuditReport) -> None:
        found, report.loadability = check_loadability(run.ckpt)
        report.findings += found
