"""Integrity: what the reader found broken (missing, truncated, out-of-bounds, compressed
storages, reference-loader refusals, shard index disagreements), bytes past the end of the file,
--crc (every zip member against its CRC-32, inflation bounded), and a shard set that does not
open, checked shard by shard.
"""

from __future__ import annotations

import re
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import Checkpoint
from ..errors import Cancelled, CorruptCheckpointError, MscopeError
from ..readers.sources.location import RemotePath, as_location
from ..values.stats import Progress, ProgressFn
from .checks import AuditRun, Check
from .findings import Finding, finding

if TYPE_CHECKING:
    from .findings import AuditReport

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
        path = as_location(s.file)
        if path not in sizes:
            if isinstance(path, RemotePath):
                sizes[path] = path.size if path.size is not None else -1
            else:
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

    from ..readers import is_zip
    from ..readers.ziparchive import STORED, ZipArchive

    out: list[Finding] = []
    checked = members = 0
    # remote archives are not CRC-checked (that reads every byte): their values are, by --stats
    files = dict.fromkeys(as_location(f) for f in (ckpt.files or [ckpt.path]))
    zips = [p for p in files if not isinstance(p, RemotePath) and is_zip(p)]
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
            by_key.setdefault((str(as_location(t.storage.file)), t.storage.key), t.qualified_name)
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




def check_shard_set(path: Path) -> list[Finding]:
    """A sharded set that failed to open, checked piece by piece: missing shards, shards that do
    not open, tensors mapped to a shard that lacks them, tensors in two shards."""
    from ..jsonfile import read_json_file
    from ..readers import open_checkpoint
    from ..readers.sharded import resolve_inside

    if path.is_dir():
        indexes = sorted(path.glob("*.index.json"))
        preferred = [p for p in indexes if p.name.endswith(".safetensors.index.json")]
        path = (preferred or indexes)[0]
    out: list[Finding] = []
    try:
        doc = read_json_file(path, CorruptCheckpointError, "a shard index")
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


class Integrity(Check):
    order = 10

    def run(self, run: AuditRun, report: AuditReport) -> None:
        found, report.integrity = check_integrity(run.ckpt)
        report.findings += found


class Crc(Check):
    order = 40

    def applies(self, run: AuditRun) -> bool:
        return run.crc

    def run(self, run: AuditRun, report: AuditReport) -> None:
        found, info = check_crc(run.ckpt, run.progress, run.cancel)
        report.findings += found
        report.integrity.update(info)
