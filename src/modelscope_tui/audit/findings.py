"""What an audit says: the code registry (`CODES`: category for --fail-on, severity, meaning),
`Finding`, and `AuditReport` with its verdict and JSON (docs/audit-schema.md). Light on purpose:
the CLI reads the --fail-on choices from here before any check is imported.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ..enums import StrEnum
from ..errors import MscopeError
from ..jsonfile import compact_json, jsonable
from ..values.stats import EXPLODING_ABS, TensorStats

SCHEMA = "mscope.audit"
SCHEMA_VERSION = 1


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"  # a note: never fails an audit


ERROR, WARNING, INFO = Severity.ERROR, Severity.WARNING, Severity.INFO
SEVERITY_ORDER = {ERROR: 0, WARNING: 1, INFO: 2}


class Code(NamedTuple):
    category: str  # the name --fail-on matches
    severity: Severity  # unless the check gives another (1-D all-zero tensors are notes)
    meaning: str


# code -> (category for --fail-on, severity, what it means). docs/audit-schema.md lists the same.
CODES: dict[str, Code] = {
    # integrity
    "unreadable-file": Code("corrupt", ERROR, "the file (or shard set) cannot be opened at all"),
    "missing-storage": Code("corrupt", ERROR, "a storage the pickle references is not in the file"),
    "truncated-storage": Code(
        "corrupt",
        ERROR,
        "a storage has fewer bytes in the file than it declares",
    ),
    "out-of-bounds": Code("corrupt", ERROR, "a tensor's view reaches past the end of its storage"),
    "compressed-storage": Code(
        "compressed",
        WARNING,
        "a storage is deflated in the zip: torch.load(mmap=True) misreads it",
    ),
    "unreadable-tensor": Code("corrupt", ERROR, "reading a tensor's bytes failed during --stats"),
    "crc-mismatch": Code("corrupt", ERROR, "a zip member's bytes do not match its CRC-32 (--crc)"),
    "corrupt": Code("corrupt", ERROR, "another structural problem the reader found"),
    "shard-missing": Code("corrupt", ERROR, "a shard listed in the index is not there"),
    "shard-unreadable": Code("corrupt", ERROR, "a shard cannot be opened"),
    "shard-tensor-missing": Code("corrupt", ERROR, "the index maps a tensor to a shard that lacks it"),
    "shard-duplicate-tensor": Code("corrupt", ERROR, "a tensor is stored in two shards"),
    "shard-unlisted-tensor": Code("shard", WARNING, "a shard holds a tensor the index does not list"),
    "shard-total-size": Code("shard", WARNING, "index total_size disagrees with the shards"),
    "reader-warning": Code("reader", WARNING, "another warning from the reader"),
    "reference-loader-refuses": Code(
        "corrupt",
        ERROR,
        "torch.load or safetensors would refuse the file, although mscope reads it",
    ),
    # load-ability
    "dangerous-global": Code(
        "dangerous",
        ERROR,
        "a global the pickle calls (outside the data constructors), tampers with, or known to run code",
    ),
    "unsafe-global": Code("unsafe", WARNING, "globals torch.load(weights_only=True) rejects"),
    "map-location": Code("device", WARNING, "tensors saved on an accelerator need map_location"),
    "no-data": Code("nodata", WARNING, "tensors stored without values (meta, quantized, sparse...)"),
    "torchscript": Code("info", INFO, "a TorchScript archive: torch.jit.load runs its code"),
    "not-torch-load": Code("info", INFO, "how this format loads (no pickle / no torch.load)"),
    # waste
    "oversized-storage": Code("waste", WARNING, "a tensor saved together with a much larger base"),
    "duplicate-tensor": Code("waste", WARNING, "identical tensors stored twice instead of tied"),
    "optimizer-state": Code("waste", INFO, "share of the file taken by optimizer state"),
    "fp32-copies": Code("waste", INFO, "fp32 tensors next to half-precision weights"),
    # quantization
    "quantized-layers": Code("info", INFO, "weights stored quantized, by scheme (the layers in details)"),
    "unquantized-layer": Code(
        "quant", WARNING, "a layer left in full precision next to quantized siblings, not listed as skipped"
    ),
    # statistics (--stats)
    "nan": Code("nan", ERROR, "tensor contains NaN"),
    "inf": Code("inf", ERROR, "tensor contains +-Inf"),
    "all-zero": Code("zero", WARNING, "every value is 0 (info for 1-D tensors such as biases)"),
    "constant": Code("constant", WARNING, "every value is the same non-zero number (info for 1-D)"),
    "exploding": Code("exploding", WARNING, f"some |value| > {EXPLODING_ABS:g}"),
    "dead": Code("dead", WARNING, "almost all zeros, or every |value| below 1e-6"),
    "norm-outlier": Code(
        "outlier",
        WARNING,
        "a layer's norm is far from the same parameter in the other layers",
    ),
    "no-stats": Code("info", INFO, "statistics not computed for this dtype"),
}

FAIL_ON_CHOICES = sorted(({c.category for c in CODES.values()} - {"info"}) | {"error", "any", "none"})
DEFAULT_FAIL_ON = ("corrupt", "dangerous", "nan", "inf")


@dataclass(slots=True)
class Finding:
    severity: Severity
    code: str  # see CODES
    message: str  # one line, for people
    tensor: str | None = None  # qualified name (section/name) for the explorer to jump to
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def category(self) -> str:
        code = CODES.get(self.code)
        return code.category if code is not None else "other"

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
    code: str, message: str, tensor: str | None = None, severity: Severity | None = None, **details: Any
) -> Finding:
    """A Finding of a registered code, with the code's severity unless one is given."""
    return Finding(severity or CODES[code].severity, code, message, tensor, details)


@dataclass
class AuditReport:
    path: Path
    format: str
    kind: str
    findings: list[Finding] = field(default_factory=list)
    stats: dict[str, TensorStats] = field(default_factory=dict)  # qualified name -> stats
    # optimizer state -> (its parameter, state key), where certain (summary.optimizer_param_names)
    param_names: dict[str, tuple[str, str]] = field(default_factory=dict)
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
        from .. import __version__

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


def parse_fail_on(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    unknown = [n for n in names if n not in FAIL_ON_CHOICES]
    if unknown:
        raise MscopeError(
            f"--fail-on: unknown name {unknown[0]!r} (choose from {', '.join(FAIL_ON_CHOICES)})"
        )
    return () if names == ("none",) else names

