"""Checkpoint audits: integrity, load-ability, waste and (streamed) value statistics.

Everything here works on a metadata-only `Checkpoint` (see readers) and reads tensor bytes only
through `TensorData`, chunk by chunk, so memory stays bounded by the chunk size whatever the file
or the largest tensor. No Textual, and no torch unless a tensor's dtype needs it (float8).

API (the CLI and the explorer use these):

- `run_audit(ckpt, stats=False, dedupe=False, crc=False, ...) -> AuditReport`: every check; with
  `stats` the statistics of every tensor (thread pool over chunks, progress and cancel).
- `audit_path(path, **kw) -> AuditReport`: opens the file (damaged files and broken shard sets
  become findings instead of errors) and runs the audit.
- `children_norms(stats, ckpt, module)`: the norm profile of a module's children.

Statistics are computed by the value layer (values/: chunks, kernels, stream_stats).
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import FLOATING_DTYPES, Checkpoint, TensorRecord, block_index, dims_key
from .errors import Cancelled, MscopeError, TensorDataError
from .jsonfile import compact_json, jsonable
from .units import fmt_bytes, sparkline
from .values.chunks import LAYOUT
from .values.digest import digest, is_constant, same_bytes
from .values.stats import DEFAULT_CHUNK_BYTES, EXPLODING_ABS, Progress, ProgressFn, TensorStats
from .values.stream import default_threads, stream_stats

if TYPE_CHECKING:
    from .values.data import TensorData

SCHEMA = "mscope.audit"
SCHEMA_VERSION = 1

ERROR, WARNING, INFO = "error", "warning", "info"
SEVERITY_ORDER = {ERROR: 0, WARNING: 1, INFO: 2}

OUTLIER_FACTOR = 10.0
OVERSIZED_RATIO = 2.0
OVERSIZED_MIN_WASTE = 64 << 10
DUPLICATE_MIN_BYTES = 1 << 10

# code -> (category for --fail-on, severity, what it means). docs/audit-schema.md lists the same.
CODES: dict[str, tuple[str, str, str]] = {
    # integrity
    "unreadable-file": ("corrupt", ERROR, "the file (or shard set) cannot be opened at all"),
    "missing-storage": ("corrupt", ERROR, "a storage the pickle references is not in the file"),
    "truncated-storage": (
        "corrupt",
        ERROR,
        "a storage has fewer bytes in the file than it declares",
    ),
    "out-of-bounds": ("corrupt", ERROR, "a tensor's view reaches past the end of its storage"),
    "compressed-storage": (
        "compressed",
        WARNING,
        "a storage is deflated in the zip: torch.load(mmap=True) misreads it",
    ),
    "unreadable-tensor": ("corrupt", ERROR, "reading a tensor's bytes failed during --stats"),
    "crc-mismatch": ("corrupt", ERROR, "a zip member's bytes do not match its CRC-32 (--crc)"),
    "corrupt": ("corrupt", ERROR, "another structural problem the reader found"),
    "shard-missing": ("corrupt", ERROR, "a shard listed in the index is not there"),
    "shard-unreadable": ("corrupt", ERROR, "a shard cannot be opened"),
    "shard-tensor-missing": ("corrupt", ERROR, "the index maps a tensor to a shard that lacks it"),
    "shard-duplicate-tensor": ("corrupt", ERROR, "a tensor is stored in two shards"),
    "shard-unlisted-tensor": ("shard", WARNING, "a shard holds a tensor the index does not list"),
    "shard-total-size": ("shard", WARNING, "index total_size disagrees with the shards"),
    "reader-warning": ("reader", WARNING, "another warning from the reader"),
    "reference-loader-refuses": (
        "corrupt",
        ERROR,
        "torch.load or safetensors would refuse the file, although mscope reads it",
    ),
    # load-ability
    "dangerous-global": (
        "dangerous",
        ERROR,
        "a global the pickle calls (outside the data constructors), tampers with, or known to run code",
    ),
    "unsafe-global": ("unsafe", WARNING, "globals torch.load(weights_only=True) rejects"),
    "map-location": ("device", WARNING, "tensors saved on an accelerator need map_location"),
    "no-data": ("nodata", WARNING, "tensors stored without values (meta, quantized, sparse...)"),
    "torchscript": ("info", INFO, "a TorchScript archive: torch.jit.load runs its code"),
    "not-torch-load": ("info", INFO, "how this format loads (no pickle / no torch.load)"),
    # waste
    "oversized-storage": ("waste", WARNING, "a tensor saved together with a much larger base"),
    "duplicate-tensor": ("waste", WARNING, "identical tensors stored twice instead of tied"),
    "optimizer-state": ("waste", INFO, "share of the file taken by optimizer state"),
    "fp32-copies": ("waste", INFO, "fp32 tensors next to half-precision weights"),
    # statistics (--stats)
    "nan": ("nan", ERROR, "tensor contains NaN"),
    "inf": ("inf", ERROR, "tensor contains +-Inf"),
    "all-zero": ("zero", WARNING, "every value is 0 (info for 1-D tensors such as biases)"),
    "constant": ("constant", WARNING, "every value is the same non-zero number (info for 1-D)"),
    "exploding": ("exploding", WARNING, f"some |value| > {EXPLODING_ABS:g}"),
    "dead": ("dead", WARNING, "almost all zeros, or every |value| below 1e-6"),
    "norm-outlier": (
        "outlier",
        WARNING,
        "a layer's norm is far from the same parameter in the other layers",
    ),
    "no-stats": ("info", INFO, "statistics not computed for this dtype"),
}

FAIL_ON_CHOICES = sorted(({c for c, _, _ in CODES.values()} - {"info"}) | {"error", "any", "none"})
DEFAULT_FAIL_ON = ("corrupt", "dangerous", "nan", "inf")


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Finding:
    severity: str  # error | warning | info
    code: str  # see CODES
    message: str  # one line, for people
    tensor: str | None = None  # qualified name (section/name) for the explorer to jump to
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def category(self) -> str:
        return CODES.get(self.code, ("other", WARNING, ""))[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "code": self.code,
            "category": self.category,
            "message": self.message,
            "tensor": self.tensor,
            "details": jsonable(self.details),
        }


def finding(
    code: str, message: str, tensor: str | None = None, severity: str | None = None, **details: Any
) -> Finding:
    return Finding(severity or CODES[code][1], code, message, tensor, details)


@dataclass
class AuditReport:
    path: Path
    format: str
    kind: str
    findings: list[Finding] = field(default_factory=list)
    stats: dict[str, TensorStats] = field(default_factory=dict)  # qualified name -> stats
    norm_profile: list[dict[str, Any]] = field(default_factory=list)
    loadability: dict[str, Any] = field(default_factory=dict)
    waste: dict[str, Any] = field(default_factory=dict)
    integrity: dict[str, Any] = field(default_factory=dict)
    fail_on: tuple[str, ...] = DEFAULT_FAIL_ON
    stats_requested: bool = False
    stats_info: dict[str, Any] = field(default_factory=dict)  # bytes read, seconds, threads, chunk
    cancelled: bool = False
    tensors: int = 0
    file_bytes: int = 0

    # -- verdict -------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        c = Counter(f.severity for f in self.findings)
        return {ERROR: c[ERROR], WARNING: c[WARNING], INFO: c[INFO]}

    def failed(self) -> dict[str, int]:
        """Fail-on names that matched, with how many findings matched each (notes never fail)."""
        out: Counter[str] = Counter()
        wanted = set(self.fail_on)
        for f in self.findings:
            if f.severity == INFO:
                continue
            if f.category in wanted:
                out[f.category] += 1
            if "error" in wanted and f.severity == ERROR:
                out["error"] += 1
            if "any" in wanted and f.severity in (ERROR, WARNING):
                out["any"] += 1
        return dict(out)

    @property
    def ok(self) -> bool:
        return not self.failed() and not self.cancelled

    @property
    def exit_code(self) -> int:
        """0: passed; 1: a --fail-on category matched (or the audit was cancelled)."""
        return 0 if self.ok else 1

    @property
    def verdict(self) -> str:
        return "pass" if self.ok else ("cancelled" if self.cancelled else "fail")

    def verdict_line(self) -> str:
        counts = self.counts()
        tail = f"{counts[ERROR]} error(s), {counts[WARNING]} warning(s), {counts[INFO]} note(s)"
        scope = "" if self.stats_requested else " (metadata only; --stats reads the values)"
        if self.cancelled:
            return f"CANCELLED: the audit stopped before reading every tensor; {tail}"
        failed = self.failed()
        if failed:
            what = ", ".join(f"{k} ({v})" for k, v in sorted(failed.items()))
            return f"FAIL: {what} [--fail-on {','.join(self.fail_on)}]; {tail}{scope}"
        if counts[ERROR] or counts[WARNING]:
            return f"PASS with findings: {tail}{scope}"
        return f"PASS: no problems found{scope}"

    def findings_for(self, tensor: str) -> list[Finding]:
        return [f for f in self.findings if f.tensor == tensor]

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        from . import __version__

        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "mscope_version": __version__,
            "file": str(self.path),
            "format": self.format,
            "kind": self.kind,
            "tensors": self.tensors,
            "file_tensor_bytes": self.file_bytes,
            "verdict": {
                "status": self.verdict,
                "line": self.verdict_line(),
                "exit_code": self.exit_code,
                "fail_on": list(self.fail_on),
                "failed": self.failed(),
                "counts": self.counts(),
            },
            "findings": [f.to_dict() for f in sorted_findings(self.findings)],
            "integrity": jsonable(self.integrity),
            "loadability": jsonable(self.loadability),
            "waste": jsonable(self.waste),
            "stats": None
            if not self.stats_requested
            else {
                **jsonable(self.stats_info),
                "tensors": [s.to_dict() for s in self.stats.values()],
                "norm_profile": jsonable(self.norm_profile),
            },
            "cancelled": self.cancelled,
        }

    def to_json(self) -> str:

        return compact_json(self.to_dict(), allow_nan=False)


def sorted_findings(findings: Iterable[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: SEVERITY_ORDER.get(f.severity, 3))



# ----------------------------------------------------------------------------------------------
# Metadata checks (no tensor bytes)
# ----------------------------------------------------------------------------------------------
_TENSOR_IN_TEXT = re.compile(r"tensor (?P<q>['\"])(?P<name>.*?)(?P=q)")


def _problem_code(text: str) -> str:
    if "is missing" in text:
        return "missing-storage"
    if "needs" in text and "but its storage" in text:
        return "out-of-bounds"
    if "holds" in text and "declares" in text or "truncated" in text or "file ends" in text:
        return "truncated-storage"
    if "inflates to" in text:
        return "truncated-storage"
    return "corrupt"


def unreadable_records(ckpt: Checkpoint) -> set[int]:
    """ids of tensor records whose bytes are not all in the file (metadata only)."""
    bad: set[int] = set(ckpt.over_budget)  # views past the file's budget: never read
    sizes: dict[Any, int] = {}
    for t in ckpt.tensors:
        s = t.storage
        if s is None or t.numel == 0:
            continue
        if s.data_offset is None or s.compressed or s.file is None:
            bad.add(id(t))
            continue
        if s.data_size is not None and s.data_size < s.nbytes:
            bad.add(id(t))
            continue
        size = sizes.get(s.file)  # keyed by the record's own value: no Path() per tensor (5 us)
        if size is None:
            try:
                size = sizes[s.file] = Path(s.file).stat().st_size
            except OSError:
                size = sizes[s.file] = -1
        if s.data_offset + s.nbytes > size:
            bad.add(id(t))
            continue
        last = t.storage_offset + sum((n - 1) * st for n, st in zip(t.shape, t.stride))
        if (last + 1) * t.itemsize > s.nbytes:
            bad.add(id(t))
    return bad


def check_integrity(ckpt: Checkpoint) -> tuple[list[Finding], dict[str, Any]]:
    out: list[Finding] = []
    for p in ckpt.problems:
        m = _TENSOR_IN_TEXT.search(p)
        name = m.group("name") if m else None
        out.append(finding(_problem_code(p), p, name))
    # Bytes past the end of the file that the reader's own bookkeeping did not catch.
    flagged = {f.tensor for f in out}
    sizes: dict[Path, int] = {}
    seen: set[int] = set()
    for t in ckpt.tensors:
        s = t.storage
        if s is None or s.file is None or s.data_offset is None or id(s) in seen:
            continue
        seen.add(id(s))
        path = Path(s.file)
        if path not in sizes:
            try:
                sizes[path] = path.stat().st_size
            except OSError:
                sizes[path] = -1
        end = s.data_offset + (s.nbytes if not s.compressed else (s.data_size or 0))
        if sizes[path] >= 0 and end > sizes[path] and t.qualified_name not in flagged:
            out.append(
                finding(
                    "truncated-storage",
                    f"storage {s.key!r} of tensor {t.qualified_name!r} ends at byte {end:,} but "
                    f"{path.name} has {sizes[path]:,}",
                    t.qualified_name,
                )
            )
    reported: set[int] = set()
    for t in ckpt.tensors:
        s = t.storage
        if s is None or not s.compressed or id(s) in reported:
            continue
        reported.add(id(s))
        out.append(
            finding(
                "compressed-storage",
                f"storage {s.key!r} of tensor {t.qualified_name!r} is deflate-compressed in the zip "
                "(the archive was re-zipped): torch.load reads it, but torch.load(mmap=True) returns "
                "wrong values and mscope cannot read its values; re-save with torch.save",
                t.qualified_name,
            )
        )
    for r in ckpt.refusals:
        out.append(finding("reference-loader-refuses", r))
    for w in ckpt.warnings:
        if "not listed in the index" in w:
            code = "shard-unlisted-tensor"
        elif "total_size" in w:
            code = "shard-total-size"
        else:
            code = "reader-warning"
        out.append(finding(code, w))
    info: dict[str, Any] = {
        "problems": list(ckpt.problems),
        "warnings": list(ckpt.warnings),
        "reference_refuses": list(ckpt.refusals),
    }
    if ckpt.format.startswith("sharded"):
        info["shards"] = ckpt.metadata.get("shards")
        info["total_size"] = ckpt.metadata.get("total_size")
        info["shard_formats"] = ckpt.metadata.get("shard_formats")
    return out, info


CRC_INFLATE_BUDGET = 1 << 30  # what --crc inflates per zip file: max(1 GiB, 64x the file)
CRC_INFLATE_RATIO = 64


def check_crc(
    ckpt: Checkpoint,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    block: int = 16 << 20,
) -> tuple[list[Finding], dict[str, Any]]:
    """CRC-32 of every member of every zip file of the checkpoint against its directory entry."""

    from .readers import is_zip
    from .readers.ziparchive import STORED, ZipArchive

    out: list[Finding] = []
    checked = members = 0
    zips = [p for p in dict.fromkeys(Path(f) for f in (ckpt.files or [ckpt.path])) if is_zip(p)]
    archives = []
    total = 0
    for path in zips:
        try:
            archive = ZipArchive(path)
        except MscopeError as exc:
            out.append(finding("crc-mismatch", f"{path.name}: cannot check CRCs ({exc.message})"))
            continue
        archives.append(archive)
        total += sum(e.compressed_size for e in archive.entries.values())
    by_key: dict[tuple[str, str], str] = {}
    for t in ckpt.tensors:
        if t.storage is not None and t.storage.file is not None:
            by_key.setdefault((str(Path(t.storage.file)), t.storage.key), t.qualified_name)
    done = 0
    t0 = time.perf_counter()
    for archive in archives:
        with archive:
            # Deflated members stream through a bounded buffer; what they may inflate to in
            # all is bounded too, so a 10 MB file of deflated zeros cannot take minutes.
            crc_budget = inflate_left = max(CRC_INFLATE_BUDGET, CRC_INFLATE_RATIO * archive.size)
            for entry in archive.entries.values():
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                members += 1
                key = entry.name.rsplit("/", 1)[-1]
                tensor = by_key.get((str(archive.path), key)) if "/data/" in entry.name else None
                if entry.method != STORED and entry.size > inflate_left:
                    out.append(
                        finding(
                            "reader-warning",
                            f"{archive.path.name}: deflated member {entry.name!r} not CRC-checked: it declares "
                            f"{entry.size:,} bytes, past what --crc inflates per file ({crc_budget:,} bytes)",
                            tensor,
                        )
                    )
                    continue
                try:
                    if entry.method != STORED:
                        inflate_left -= entry.size  # inflate() stops at the declared size
                    good = archive.crc_ok(entry, block)
                except MscopeError as exc:
                    out.append(
                        finding("crc-mismatch", f"{archive.path.name}: {exc.message}", tensor)
                    )
                    continue
                checked += 1
                done += entry.compressed_size
                if progress is not None:
                    progress(Progress(done, total, time.perf_counter() - t0, entry.name))
                if not good:
                    what = f" (storage of {tensor!r})" if tensor else ""
                    out.append(
                        finding(
                            "crc-mismatch",
                            f"{archive.path.name}: member {entry.name!r}{what} fails its CRC-32 check",
                            tensor,
                            member=entry.name,
                        )
                    )
    info = {"crc_checked": checked, "crc_members": members, "crc_files": len(zips)}
    if not zips:
        info["crc_note"] = f"{ckpt.format} files carry no checksums"
    return out, info


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
        "torch-zip",
        "torch-legacy",
        "pickle",
        "torchscript",
        "sharded-torch",
        "dcp",
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
    if ckpt.format == "torchscript":
        out.append(
            finding(
                "torchscript",
                "TorchScript archive: torch.load hands it to torch.jit.load, which runs the archive's "
                "code; load it only if you trust it",
            )
        )
    elif ckpt.format in ("safetensors", "sharded-safetensors"):
        out.append(
            finding("not-torch-load", "safetensors: no pickle, nothing can run when it loads")
        )
    elif ckpt.format == "dcp":
        out.append(
            finding("not-torch-load", "DCP directory: load with torch.distributed.checkpoint.load")
        )
    elif ckpt.format == "pickle":
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
            "weights_only": (not unsafe and not dangerous and ckpt.format != "torchscript")
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


_OPT_MOMENTS = (
    "exp_avg",
    "exp_avg_sq",
    "momentum_buffer",
    "square_avg",
    "max_exp_avg_sq",
    "sum",
    "acc_delta",
)
HALF_DTYPES = ("float16", "bfloat16")


def check_waste(ckpt: Checkpoint) -> tuple[list[Finding], dict[str, Any]]:
    out: list[Finding] = []
    totals = ckpt.totals()
    info: dict[str, Any] = {"file_tensor_bytes": totals.file_bytes}

    # A view saved with its whole base: torch.save writes the entire storage.
    views: dict[int, list[TensorRecord]] = defaultdict(list)
    storages = {}
    for t in ckpt.tensors:
        if t.storage is not None:
            views[id(t.storage)].append(t)
            storages[id(t.storage)] = t.storage
    oversized = []
    for sid, ts in views.items():
        s = storages[sid]
        if s.nbytes == 0:
            continue
        spans = []
        for t in ts:
            if t.numel == 0:
                continue
            last = t.storage_offset + sum((n - 1) * st for n, st in zip(t.shape, t.stride))
            spans.append((t.storage_offset, last + 1))
        used = _union_length(spans) * DTYPE_SIZE(s.dtype)
        wasted = s.nbytes - used
        if wasted >= OVERSIZED_MIN_WASTE and s.nbytes >= OVERSIZED_RATIO * max(used, 1):
            t = max(ts, key=lambda x: x.nbytes)
            ratio = s.nbytes / max(used, 1)
            oversized.append(
                {"tensor": t.qualified_name, "storage_bytes": s.nbytes, "used_bytes": used}
            )
            out.append(
                finding(
                    "oversized-storage",
                    f"{t.qualified_name} {list(t.shape)} uses {fmt_bytes(used)} of a "
                    f"{fmt_bytes(s.nbytes)} storage ({ratio:.0f}x): it was saved with its whole base; "
                    "save tensor.clone() instead",
                    t.qualified_name,
                    storage_bytes=s.nbytes,
                    used_bytes=used,
                )
            )
    info["oversized_storages"] = oversized
    info["oversized_waste_bytes"] = sum(o["storage_bytes"] - o["used_bytes"] for o in oversized)

    # Optimizer state.
    opt_bytes = sum(
        totals.sections.get(name.split(".", 1)[0], {}).get("bytes", 0)
        for name, role in ckpt.sections.items()
        if role == "optimizer"
    )
    info["optimizer_bytes"] = opt_bytes
    info["optimizer_share"] = opt_bytes / totals.file_bytes if totals.file_bytes else 0.0
    if opt_bytes:
        out.append(
            finding(
                "optimizer-state",
                f"optimizer state is {fmt_bytes(opt_bytes)} ({100 * info['optimizer_share']:.0f}% of the "
                f"file's tensor bytes); an inference copy needs only the model ({fmt_bytes(totals.nbytes)})",
                bytes=opt_bytes,
            )
        )

    # fp32 copies next to half-precision weights.
    model = [t for t in ckpt.tensors if t.section == "" and t.alias_of is None]
    half_shapes = Counter(dims_key(t.shape) for t in model if t.dtype in HALF_DTYPES and len(t.shape) >= 1)
    copies = []
    if half_shapes:
        half_bytes = sum(t.nbytes for t in model if t.dtype in HALF_DTYPES)
        model_bytes = sum(t.nbytes for t in model) or 1
        for t in ckpt.tensors:
            if (
                t.dtype != "float32"
                or t.alias_of is not None
                or t.numel < 2
                or dims_key(t.shape) not in half_shapes
            ):
                continue
            leaf = t.name.rsplit(".", 1)[-1]
            if t.section:
                if (
                    ckpt.sections.get(t.section.split(".", 1)[0]) == "optimizer"
                    and leaf in _OPT_MOMENTS
                ):
                    continue
                copies.append(t)
            elif half_bytes >= model_bytes / 2 and len(t.shape) >= 2:
                copies.append(t)
    if copies:
        b = sum(t.nbytes for t in copies)
        info["fp32_copies"] = {
            "tensors": len(copies),
            "bytes": b,
            "examples": [t.qualified_name for t in copies[:5]],
        }
        out.append(
            finding(
                "fp32-copies",
                f"{len(copies)} float32 tensor(s) ({fmt_bytes(b)}) have the shapes of half-precision "
                f"weights (master copies?), e.g. {copies[0].qualified_name}",
                copies[0].qualified_name,
                tensors=len(copies),
                bytes=b,
            )
        )
    else:
        info["fp32_copies"] = {"tensors": 0, "bytes": 0, "examples": []}
    return out, info


def DTYPE_SIZE(dtype: str) -> int:  # noqa: N802 - reads like the table it wraps
    from .checkpoint import DTYPE_ITEMSIZE

    return DTYPE_ITEMSIZE.get(dtype, 1)


def _union_length(spans: list[tuple[int, int]]) -> int:
    total = 0
    end = None
    for a, b in sorted(spans):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


# ----------------------------------------------------------------------------------------------
# Duplicates (reads bytes)
# ----------------------------------------------------------------------------------------------
def find_duplicates(
    data: TensorData,
    ckpt: Checkpoint,
    stats: Mapping[str, TensorStats] | None = None,
    skip: set[int] | None = None,
    chunk_bytes: int = 4 << 20,
    cancel: threading.Event | None = None,
) -> list[list[TensorRecord]]:
    """Groups of tensors with identical dtype, shape and bytes that do not share a storage.

    Only same-dtype, same-shape candidates are read. With `stats` (from --stats) the statistics
    are the first filter (identical bytes give identical statistics, bit for bit), so usually
    nothing is read again; without, candidates are hashed (BLAKE2b). Constant tensors (zero
    biases, unit norms) are left out: two equal constants are not waste worth tying.
    """
    skip = skip or set()
    groups: dict[tuple, list[TensorRecord]] = defaultdict(list)
    seen_storage: dict[int, TensorRecord] = {}
    for t in ckpt.tensors:
        if (
            t.storage is None
            or t.alias_of is not None
            or id(t) in skip
            or t.nbytes < DUPLICATE_MIN_BYTES
        ):
            continue
        if t.dtype not in LAYOUT:
            continue
        if (
            id(t.storage) in seen_storage
            and seen_storage[id(t.storage)].storage_offset == t.storage_offset
        ):
            continue  # tied: shares the storage already
        seen_storage.setdefault(id(t.storage), t)
        key: tuple = (t.dtype, dims_key(t.shape))
        if stats is not None:
            st = stats.get(t.qualified_name)
            if st is None or st.min == st.max:
                continue
            key = (*key, st.min, st.max, st.mean, st.std, st.sumsq, st.zeros, st.nan, st.inf)
        groups[key].append(t)
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        try:
            if stats is not None:
                first = members[0]
                same = [first] + [
                    m for m in members[1:] if same_bytes(data, first, m, chunk_bytes)
                ]
                if len(same) > 1:
                    out.append(same)
                continue
            by_digest: dict[bytes, list[TensorRecord]] = defaultdict(list)
            for m in members:
                by_digest[digest(data, m, chunk_bytes)].append(m)
            for same in by_digest.values():
                if len(same) > 1 and not is_constant(data, same[0], chunk_bytes):
                    out.append(same)
        except TensorDataError:
            continue
    return out



# ----------------------------------------------------------------------------------------------
# Norm profile
# ----------------------------------------------------------------------------------------------
_LAYER = re.compile(r"^(?P<container>.*?)\.(?P<index>\d+)\.(?P<role>.+)$")


def norm_profile(
    stats: Mapping[str, TensorStats], ckpt: Checkpoint
) -> tuple[list[dict[str, Any]], list[Finding]]:
    """Per repeated block (`transformer.h.0`, `layers.11`...) the L2 norm of its floating-point
    parameters, and each parameter compared across the blocks built alike (same names and
    shapes, so a Sequential's conv and BatchNorm are not compared): a norm more than
    OUTLIER_FACTOR from the median of at least 4 such blocks is a `norm-outlier` finding."""
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
    node = ckpt.tree
    if module:
        for part in module.split("."):
            node = node.children.get(part)
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


# ----------------------------------------------------------------------------------------------
# The audit
# ----------------------------------------------------------------------------------------------
def run_audit(
    ckpt: Checkpoint,
    stats: bool = False,
    dedupe: bool = False,
    crc: bool = False,
    fail_on: Iterable[str] = DEFAULT_FAIL_ON,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> AuditReport:
    """Every check on an opened checkpoint (open it with `strict=False`).

    Metadata checks always run and read no tensor bytes. `stats` streams every tensor's values
    (and finds duplicates from them); `dedupe` finds duplicates without statistics (hashes
    same-shape candidates); `crc` checks every zip member's CRC-32. When `cancel` is set the
    report comes back early with `cancelled=True` and what was found so far.
    """
    totals = ckpt.totals()
    report = AuditReport(
        ckpt.path,
        ckpt.format,
        ckpt.kind,
        fail_on=tuple(fail_on),
        stats_requested=stats,
        tensors=len(ckpt.tensors),
        file_bytes=totals.file_bytes,
    )
    found, report.integrity = check_integrity(ckpt)
    report.findings += found
    found, report.loadability = check_loadability(ckpt)
    report.findings += found
    found, report.waste = check_waste(ckpt)
    report.findings += found
    bad = unreadable_records(ckpt)
    try:
        if crc:
            found, info = check_crc(ckpt, progress, cancel)
            report.findings += found
            report.integrity.update(info)
        if stats:
            _run_stats(report, ckpt, bad, chunk_bytes, threads, progress, cancel)
        if dedupe or stats:
            from .values.data import TensorData

            with TensorData() as data:
                groups = find_duplicates(
                    data, ckpt, report.stats if stats else None, bad, cancel=cancel
                )
            _duplicate_findings(report, groups)
    except Cancelled:
        report.cancelled = True
    return report


def _duplicate_findings(report: AuditReport, groups: list[list[TensorRecord]]) -> None:
    dupes = []
    for g in groups:
        extra = sum(t.nbytes for t in g[1:])
        names = [t.qualified_name for t in g]
        dupes.append({"tensors": names, "bytes_each": g[0].nbytes, "wasted_bytes": extra})
        others = ", ".join(names[1:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        report.findings.append(
            finding(
                "duplicate-tensor",
                f"{names[0]} is stored {len(g)} times with identical bytes ({others}); "
                f"{fmt_bytes(extra)} could be saved by tying them",
                names[1],
                tensors=names,
                wasted_bytes=extra,
            )
        )
    report.waste["duplicates"] = dupes
    report.waste["duplicate_waste_bytes"] = sum(d["wasted_bytes"] for d in dupes)


def _run_stats(report, ckpt, bad, chunk_bytes, threads, progress, cancel) -> None:
    from .values.data import TensorData

    records = []
    by_view: dict[tuple, TensorRecord] = {}
    copies: list[tuple[TensorRecord, TensorRecord]] = []
    skipped: list[dict[str, Any]] = []
    no_stats = Counter()
    for t in ckpt.tensors:
        if id(t) in bad or t.storage is None:
            continue
        if t.dtype not in LAYOUT:
            no_stats[t.dtype] += 1
            skipped.append({"tensor": t.qualified_name, "reason": f"dtype {t.dtype}"})
            continue
        view = (id(t.storage), t.storage_offset, t.shape, t.stride, t.dtype)
        first = by_view.get(view)
        if first is not None:  # the same view of the same storage: same values
            copies.append((t, first))
            continue
        by_view[view] = t
        records.append(t)
    # Read in file order: sequential pages, one pass over each file.
    records.sort(key=lambda t: (str(t.storage.file), t.storage.data_offset or 0, t.storage_offset))
    for dtype, n in no_stats.items():
        report.findings.append(
            finding("no-stats", f"{n} tensor(s) of dtype {dtype}: no statistics")
        )
    threads = threads or default_threads()
    t0 = time.perf_counter()
    errors: list[Finding] = []

    def on_error(r: TensorRecord, exc: MscopeError) -> None:
        errors.append(
            finding("unreadable-tensor", f"{r.qualified_name}: {exc.message}", r.qualified_name)
        )

    done = 0
    try:
        with TensorData() as data:
            for r, st in stream_stats(
                data, records, chunk_bytes, threads, progress, cancel, on_error
            ):
                report.stats[r.qualified_name] = st
                done += r.nbytes
    finally:
        report.findings += errors
        for t, first in copies:
            st = report.stats.get(first.qualified_name)
            if st is not None:
                report.stats[t.qualified_name] = TensorStats(
                    t.qualified_name, st.dtype, st.shape, st.numel, st.min, st.max, st.mean, st.std,
                    st.sumsq, st.zeros, st.nan, st.inf, st.finite, list(st.flags),
                )  # fmt: skip
        seconds = time.perf_counter() - t0
        report.stats_info = {
            "bytes_read": done,
            "seconds": round(seconds, 3),
            "threads": threads,
            "chunk_bytes": chunk_bytes,
            "skipped": skipped,
        }
        _stat_findings(report, ckpt)


def _stat_findings(report: AuditReport, ckpt: Checkpoint) -> None:
    """Findings from the flags. Model tensors get every flag (all-zero / constant 1-D tensors,
    biases and norm weights at init, as notes). Optimizer state: only NaN / Inf (tiny or zero
    moments are normal). Anything else (callbacks, metrics): NaN / Inf as notes, since
    `best_score = inf` is a common sentinel."""
    records = {t.qualified_name: t for t in ckpt.tensors}
    for name, st in report.stats.items():
        t = records.get(name)
        one_d = t is not None and len(t.shape) <= 1
        section = t.section.split(".", 1)[0] if t is not None else ""
        role = "model" if not section else ckpt.sections.get(section, "other")
        if role != "model":
            st.flags = [f for f in st.flags if f in ("nan", "inf")]
        for flag in st.flags:
            if flag == "nan":
                msg = f"{name}: {st.nan:,} NaN value(s) of {st.numel:,}"
            elif flag == "inf":
                msg = f"{name}: {st.inf:,} infinite value(s) of {st.numel:,}"
            elif flag == "all-zero":
                msg = f"{name} {list(st.shape)}: every value is 0"
            elif flag == "constant":
                msg = f"{name} {list(st.shape)}: every value is {st.min:g}"
            elif flag == "exploding":
                msg = f"{name}: |value| up to {st.abs_max:.4g} (> {EXPLODING_ABS:g})"
            elif flag == "dead":
                msg = f"{name}: {100 * st.zero_fraction:.1f}% zeros, max |value| {st.abs_max:.3g}"
            else:
                msg = f"{name}: {flag}"
            severity = None
            if flag in ("all-zero", "constant") and one_d:
                severity = INFO
            elif role not in ("model", "optimizer"):
                severity = INFO
                msg += f" (in {section}, outside the model and optimizer)"
            report.findings.append(finding(flag, msg, name, severity))
    profile, found = norm_profile(report.stats, ckpt)
    report.norm_profile = profile
    report.findings += found


def audit_path(path: str | os.PathLike, **kwargs: Any) -> AuditReport:
    """Open and audit. Files that cannot be opened become a report with an `unreadable-file`
    finding; a sharded set that does not open is checked shard by shard. NotFoundError and
    UnsupportedFormatError still raise (nothing to audit)."""
    from .errors import CorruptCheckpointError, UnsafePickleError, UnsupportedFormatError
    from .readers import open_checkpoint, sniff

    path = Path(path)
    try:
        ckpt = open_checkpoint(path, strict=False)
    except (CorruptCheckpointError, UnsafePickleError, TensorDataError, UnsupportedFormatError) as exc:
        # A payload counts even where the checkpoint does not: pickle.load runs it before it
        # notices the damage (the reader searched the file, see readers.payloads).
        payloads = [g for g in getattr(exc, "pickle_globals", ()) if g.safety == "dangerous"]
        if isinstance(exc, UnsupportedFormatError) and not payloads:
            raise
        kind = None
        try:
            kind = sniff(path)
        except MscopeError:
            pass
        report = AuditReport(
            path,
            kind or "unknown",
            "unknown",
            fail_on=tuple(kwargs.get("fail_on", DEFAULT_FAIL_ON)),
        )
        report.stats_requested = bool(kwargs.get("stats"))
        if kind in ("index-json", "index-dir"):
            report.format = "sharded"
            report.findings += check_shard_set(path)
        if not report.findings:
            report.findings.append(finding("unreadable-file", exc.message, None, hint=exc.hint))
        report.findings += dangerous_findings(payloads)
        if payloads:
            report.loadability["dangerous_globals"] = [g.qualname for g in payloads]
        return report
    return run_audit(ckpt, **kwargs)


def check_shard_set(path: Path) -> list[Finding]:
    """A sharded set that failed to open, checked piece by piece: missing shards, shards that do
    not open, tensors mapped to a shard that lacks them, tensors in two shards."""
    from .readers import open_checkpoint, read_json_limited
    from .readers.sharded import resolve_inside

    if path.is_dir():
        indexes = sorted(path.glob("*.index.json"))
        preferred = [p for p in indexes if p.name.endswith(".safetensors.index.json")]
        path = (preferred or indexes)[0]
    out: list[Finding] = []
    try:
        doc = read_json_limited(path)
        weight_map = doc["weight_map"]  # type: ignore[index]
        wanted: dict[str, list[str]] = defaultdict(list)
        for tensor, shard in weight_map.items():
            wanted[shard].append(tensor)
    except (MscopeError, KeyError, TypeError, AttributeError) as exc:
        return [finding("unreadable-file", f"{path.name}: not a usable shard index ({exc})")]
    where: dict[str, str] = {}
    for shard in sorted(wanted):
        try:
            shard_path = resolve_inside(path.parent, shard, "shard", path)
        except MscopeError as exc:
            out.append(finding("shard-unreadable", exc.message, shard=shard))
            continue
        if not shard_path.is_file():
            out.append(
                finding(
                    "shard-missing",
                    f"shard {shard} listed in {path.name} is missing ({len(wanted[shard])} tensors)",
                    shard=shard,
                    tensors=len(wanted[shard]),
                )
            )
            continue
        try:
            part = open_checkpoint(shard_path, strict=False)
        except MscopeError as exc:
            out.append(finding("shard-unreadable", f"shard {shard}: {exc.message}", shard=shard))
            continue
        names = set()
        for t in part.tensors:
            name = t.name if not t.section else f"{t.section}.{t.name}"
            if part.model_path and not t.section:
                name = f"{part.model_path}.{name}"
            names.add(name)
            if name in where:
                out.append(
                    finding(
                        "shard-duplicate-tensor",
                        f"tensor {name} is in two shards: {where[name]} and {shard}",
                        name,
                    )
                )
            where.setdefault(name, shard)
        lacking = [n for n in wanted[shard] if n not in names]
        if lacking:
            more = f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else ""
            out.append(
                finding(
                    "shard-tensor-missing",
                    f"tensor {lacking[0]} is mapped to shard {shard} but is not in it{more}",
                    lacking[0],
                )
            )
        for p in part.problems:
            m = _TENSOR_IN_TEXT.search(p)
            out.append(
                finding(_problem_code(p), f"shard {shard}: {p}", m.group("name") if m else None)
            )
    return out


# ----------------------------------------------------------------------------------------------
# Text report
# ----------------------------------------------------------------------------------------------
def render_audit(report: AuditReport, console: Any, limit: int = 40, all_stats: bool = False) -> None:
    """The text report: errors and warnings, notes (init-like 1-D tensors counted, not listed),
    the add_safe_globals line, statistics of flagged and largest tensors, the verdict last."""
    from rich.table import Table

    from .textout import safe_markup as escape  # text from files: controls, then markup

    name = report.path.name
    console.print(
        f"[bold]{escape(name)}[/] · {report.format} · {report.tensors:,} tensors · {fmt_bytes(report.file_bytes)}"
    )
    style = {ERROR: "bold red", WARNING: "yellow", INFO: "dim"}
    folded = Counter(
        f.code for f in report.findings if f.severity == INFO and f.code in ("all-zero", "constant")
    )
    findings = [
        f for f in sorted_findings(report.findings) if not (f.severity == INFO and f.code in folded)
    ]
    shown = findings[:limit]
    if shown:
        table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
        table.add_column("", no_wrap=True)
        table.add_column("code", no_wrap=True)
        table.add_column("finding", overflow="fold")
        for f in shown:
            table.add_row(
                f"[{style.get(f.severity, '')}]{f.severity}[/]", f.code, escape(f.message)
            )
        console.print(table)
        if len(findings) > len(shown):
            console.print(
                f"[dim]... {len(findings) - len(shown)} more findings (--json lists all)[/]"
            )
    if folded:
        what = " and ".join(
            f"{n} {'all-zero' if c == 'all-zero' else 'constant'}" for c, n in folded.items()
        )
        console.print(
            f"[dim]notes: {what} 1-D tensor(s) (biases / norm weights as initialised; --json lists them)[/]"
        )
    line = report.loadability.get("add_safe_globals")
    if line and not report.loadability.get("dangerous_globals"):
        console.print("[bold]to load with weights_only=True[/] (only if you trust the file):")
        console.print(f"  {escape(line)}", soft_wrap=True)
    if report.stats_requested and report.stats:
        info = report.stats_info
        console.print(
            f"[bold]statistics[/]: {len(report.stats):,} tensors, {fmt_bytes(info.get('bytes_read', 0))} "
            f"read in {info.get('seconds', 0):.2f} s ({info.get('threads')} thread(s))"
        )
        loud = {f.tensor for f in report.findings if f.severity != INFO and f.tensor}
        flagged = [s for s in report.stats.values() if s.name in loud]
        biggest = [
            s for s in sorted(report.stats.values(), key=lambda s: -s.numel) if s.name not in loud
        ]
        rows = flagged + biggest if all_stats else flagged[:20] + biggest[: max(3, 10 - len(flagged))]
        # Numbers are never cut (at 80 columns they came out as "-0.1…"): their columns take
        # what they need and the tensor name gives way, shortened in the middle.
        heads: tuple[str, ...] = ("min", "max", "mean", "std", "norm", "zeros", "flags")
        cells = [
            [_g(s.min), _g(s.max), _g(s.mean), _g(s.std), _g(s.norm), f"{100 * s.zero_fraction:.1f}%", ",".join(s.flags)]
            for s in rows
        ]  # fmt: skip
        if not any(c[-1] for c in cells):  # no flags: the names get the room
            heads, cells = heads[:-1], [c[:-1] for c in cells]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
        name_width = max(12, min(40, console.width - sum(widths) - 2 * len(heads)))
        table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
        table.add_column("tensor", no_wrap=True, max_width=name_width)
        for head, width in zip(heads, widths):
            table.add_column(head, no_wrap=True, min_width=width, justify="left" if head == "flags" else "right")
        for s, c in zip(rows, cells):
            table.add_row(escape(_fit_name(s.name, name_width)), *c)
        console.print(table)
        if len(rows) < len(report.stats):
            console.print(
                f"[dim]{len(rows):,} of {len(report.stats):,} tensors shown (flagged, then largest);"
                " --all-stats lists all[/]"
            )
        for prof in report.norm_profile[:3]:
            norms = [r["norm"] for r in prof["layers"]]
            console.print(
                f"norm profile of {escape(prof['container'])} ({len(norms)} layers): "
                f"{sparkline(norms, fit=True, floor=True)}  min {min(norms):.4g}, max {max(norms):.4g}"
            )
    color = (
        "green"
        if report.ok and not report.counts()[ERROR]
        else ("red" if not report.ok else "yellow")
    )
    console.print(f"[bold {color}]{escape(report.verdict_line())}[/]")


def _fit_name(name: str, width: int) -> str:
    """A dotted name in `width` columns: module names shortened to their first letter from the
    left, numbers and the last part kept (`m.e.layers.0.self_attn.in_proj_weight` ->
    `m.e.l.0.s.in_proj_weight`), so layer numbers stay visible; then cut in the middle."""
    if len(name) <= width:
        return name
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if len(parts[i]) > 1 and not parts[i].isdigit():
            parts[i] = parts[i][0]
            short = ".".join(parts)
            if len(short) <= width:
                return short
    short = ".".join(parts)
    head = (width - 1) // 2
    return short[:head] + "…" + short[len(short) - (width - 1 - head) :]


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def parse_fail_on(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    unknown = [n for n in names if n not in FAIL_ON_CHOICES]
    if unknown:
        raise MscopeError(
            f"--fail-on: unknown name {unknown[0]!r} (choose from {', '.join(FAIL_ON_CHOICES)})"
        )
    return () if names == ("none",) else names


__all__ = [
    "Cancelled",
    "AuditReport",
    "CODES",
    "Finding",
    "audit_path",
    "children_norms",
    "norm_profile",
    "run_audit",
]
