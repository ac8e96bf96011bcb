"""torch.save zip archives (`.pt`, `.pth`, `.bin`, `.ckpt`) and TorchScript archives."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoint import (
    BUFFER,
    PARAMETER,
    TENSOR,
    Checkpoint,
    Format,
    ModuleNode,
    StorageRecord,
    join_name,
)
from ..errors import CorruptCheckpointError, MscopeError
from .pickle.unpickler import Inert, StorageType, TensorRef, safe_load
from .walk import Walker, is_plain
from .ziparchive import STORED, InflateBudgetError, ZipArchive

MAX_PICKLE_BYTES = 1 << 31
MAX_CODE_BYTES = 16 << 20


def archive_prefix(archive: ZipArchive) -> str | None:
    """The record folder torch writes everything under (`archive/`, or the file's stem)."""
    for name in archive.entries:
        if name.endswith("data.pkl") and name.count("/") == 1:
            return name[: -len("data.pkl")]
    return None


# General-purpose flag bits torch's zip reader (miniz) refuses to read a member with:
# 0 encrypted, 6 strong encryption, 5 compressed patched data.
REFUSED_FLAGS = {0: "encrypted", 6: "strongly encrypted", 5: "patched data"}


def reference_refusals(archive: ZipArchive, prefix: str) -> list[str]:
    """Why torch.load / torch.jit.load (PyTorchStreamReader) would refuse an archive mscope can
    read, in plain words. Its rules: the first member's top-level folder is the record folder and
    every member must sit under it (a second folder or a member at the root hides a pickle from
    scanners that take only one; CVE-2025-1944-style disagreements); no member may carry the
    encryption or patched-data flag bits, or be compressed with anything but deflate; the
    archive needs a `version` record."""
    out: list[str] = []
    names = list(archive.entries)
    first = names[0] if names else ""
    folder = first[: first.index("/") + 1] if "/" in first else None
    if folder is None:
        out.append(f"torch.load refuses this archive: its first member {first[:80]!r} is not in a folder")
    else:
        stray = [n for n in names if not n.startswith(folder)]
        if stray:
            more = f" and {len(stray) - 1:,} more" if len(stray) > 1 else ""
            out.append(
                f"torch.load refuses this archive: member {stray[0][:80]!r}{more} is outside its record "
                f"folder {folder!r} (torch wants every member under one top-level folder; other "
                "scanners and loaders may read the other one)"
            )
        if folder != prefix:
            out.append(
                f"torch.load refuses this archive or reads another pickle: its record folder is "
                f"{folder!r}, but the checkpoint's data.pkl is under {prefix!r}"
            )
    refused_mask = sum(1 << bit for bit in REFUSED_FLAGS)
    flagged = archive.flag_bits & refused_mask  # or-ed over the directory: no walk when clean
    for entry in list(archive.entries.values()) + archive.shadowed if flagged else ():
        bits = [what for bit, what in REFUSED_FLAGS.items() if entry.flags >> bit & 1]
        if bits:
            out.append(
                f"torch.load refuses this archive: member {entry.name[:80]!r} is flagged {' and '.join(bits)} "
                f"(zip flag bits 0x{entry.flags:04x})"
            )
            break
    for entry in archive.entries.values() if archive.odd_methods else ():
        if entry.method not in (0, 8):
            out.append(
                f"torch.load refuses this archive: member {entry.name[:80]!r} uses compression method "
                f"{entry.method} (torch reads stored and deflated members only)"
            )
            break
    if archive.multidisk:
        out.append("torch.load refuses this archive: its end record describes a split (multi-disk) archive")
    order = archive.entries.get(f"{prefix}byteorder")
    if order is not None:
        try:
            value = archive.read(order.name, 16)
        except MscopeError:
            value = None
        if value not in (b"little", b"big"):
            shown = repr(value[:16]) if value is not None else "unreadable"
            out.append(f"torch.load refuses this archive: its byteorder record is {shown}, not 'little' or 'big'")
    version = archive.entries.get(f"{prefix}version") or archive.entries.get(f"{prefix}.data/version")
    if version is None:
        out.append(f"torch.load refuses this archive: it has no {prefix}version record")
    return out


def is_torchscript(archive: ZipArchive, prefix: str) -> bool:
    return f"{prefix}constants.pkl" in archive.entries and any(n.startswith(f"{prefix}code/") for n in archive.entries)


class StorageTable:
    """persistent_load for archive storages: one StorageRecord per key, shared by its tensors.
    `locate()` then finds where each one's bytes are in the archive."""

    def __init__(self, path: Path, archive: ZipArchive | None, folder: str, byteorder: str = "little"):
        self.path = path
        self.archive = archive
        self.folder = folder
        self.byteorder = byteorder
        self.records: dict[str, StorageRecord] = {}
        self.problems: list[str] = []  # what Checkpoint.check_storage_bounds cannot see
        self.members: list[str] = []  # archive members holding these storages (set by locate)

        self.load = self._loader()  # the persistent_load to pass to the unpickler

    def _loader(self) -> Callable[[Any], StorageRecord]:
        """persistent_load as a closure over locals: it runs once per tensor (100k times in a big
        state_dict), and attribute lookups on self were half its cost. No reference to self in
        here: the cycle would keep the archive alive for the rest of a gc-disabled command."""
        records = self.records
        path, byteorder = self.path, self.byteorder

        def load(pid: Any) -> StorageRecord:
            if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
                if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
                    raise CorruptCheckpointError(f"unexpected persistent id {str(pid)[:80]}", path)
                pid = tuple(pid[:5])
            _, storage_type, key, location, numel = pid
            record = records.get(key)
            if record is not None:
                return record
            if type(storage_type) is not StorageType:
                name = getattr(getattr(storage_type, "_global", None), "qualname", None) or type(storage_type).__name__
                raise CorruptCheckpointError(f"unknown storage type {name[:80]}", path)
            if type(key) is not str or len(key) > 256 or type(numel) is not int or not 0 <= numel < 1 << 62:
                raise CorruptCheckpointError(f"malformed storage reference {str(pid)[:80]}", path)
            record = records[key] = StorageRecord(
                key, storage_type.dtype, numel, location[:64] if type(location) is str else "cpu", path,
                None, None, False, byteorder,
            )  # fmt: skip
            return record

        return load

    def locate(self) -> None:
        """Where each storage's bytes are: one pass over the records after unpickling, in the
        archive's own order. Looking each one up inside persistent_load, between the unpickler's
        allocations, took twice as long (cold directory entries). A storage whose member is
        missing keeps data_offset None (check_storage_bounds reports it)."""
        archive = self.archive
        if archive is None:
            return
        entries, folder = archive.entries, self.folder
        members = self.members
        predicted = False
        if archive.remote:
            wanted = [e for e in (entries.get(folder + k) for k in self.records) if e is not None]
            predicted = archive.locate_remote(wanted)
        for key, record in self.records.items():
            entry = entries.get(folder + key)
            if entry is None:
                continue
            members.append(entry.name)  # the directory's own string: its hash is already known
            start = entry.data_start
            if predicted:
                start = archive.predicted_offset(entry)
                record.header_offset = entry.header_offset  # TensorData checks it before reading
            elif start is None:
                start = archive.data_offset(entry)
            stored = entry.method == STORED
            record.data_offset = start
            record.data_size = entry.compressed_size if not stored or entry.size > entry.compressed_size else entry.size
            record.compressed = not stored
            if not stored and entry.size < record.nbytes:
                # the directory says what it inflates to
                self.problems.append(
                    f"storage {key!r} inflates to {entry.size:,} bytes but declares {record.nbytes:,}"
                )


def read_torch_zip(path: Path, archive: ZipArchive) -> Checkpoint:
    prefix = archive_prefix(archive)
    if prefix is None:
        raise CorruptCheckpointError(
            "zip archive without a data.pkl: not a torch checkpoint", path, "was it written by torch.save?"
        )
    if is_torchscript(archive, prefix):
        return read_torchscript(path, archive, prefix)
    byteorder = _byteorder(archive, prefix)
    storages = StorageTable(path, archive, f"{prefix}data/", byteorder)
    data = archive.read(f"{prefix}data.pkl", MAX_PICKLE_BYTES, verify=True)
    root, globals_, _ = safe_load(data, source=f"{path.name}:{prefix}data.pkl", persistent_load=storages.load)
    storages.locate()
    ckpt = Checkpoint(path, Format.TORCH_ZIP, files=[path])
    ckpt.globals = globals_
    ckpt.metadata["archive_prefix"] = prefix.rstrip("/")
    ckpt.metadata["byteorder"] = byteorder
    version = archive.entries.get(f"{prefix}version")
    if version is not None and version.size < 64:
        ckpt.metadata["archive_version"] = archive.read(version.name, 64).decode("ascii", "replace").strip()
    if archive.duplicates:
        ckpt.problems.append(f"archive has duplicate members: {', '.join(archive.duplicates[:3])}")
        ckpt.globals.extend(shadowed_pickle_globals(path, archive, ckpt.problems))
    ckpt.globals.extend(other_member_globals(archive, [f"{prefix}data.pkl"], storages))
    ckpt.problems.extend(storages.problems)
    ckpt.refusals.extend(reference_refusals(archive, prefix))
    _deflated_warning(ckpt, archive)
    Walker(ckpt).walk_root(root)
    return ckpt


def _deflated_warning(ckpt: Checkpoint, archive: ZipArchive) -> None:
    """torch.save writes every member stored: what was inflated is recorded (a re-zipped
    archive's storages are reported by audit's compressed-storage finding)."""
    if archive.deflated_read:
        ckpt.metadata["inflated_members"] = {"names": archive.deflated_read[:16], "bytes": archive.inflated}


def shadowed_pickle_globals(path: Path, archive: ZipArchive, problems: list[str]) -> list:
    """Globals of the earlier copies of a repeated `.pkl` member: torch's reader may load a copy
    other than the one we show, so a payload hidden there must still be listed."""
    found = []
    for entry in archive.shadowed:
        if not entry.name.endswith(".pkl"):
            continue
        source = f"{path.name}:{entry.name} (duplicate copy)"
        try:
            start = archive.data_offset(entry)
            if entry.method != STORED or entry.size != entry.compressed_size or entry.size > MAX_PICKLE_BYTES:
                raise CorruptCheckpointError(f"{source} is compressed or too large to check")
            data = archive.buffer[start : start + entry.size]
            _, refs, _ = safe_load(data, source=source, persistent_load=lambda pid: None)
        except MscopeError as exc:
            problems.append(exc.message)
            continue
        found.extend(refs)
    return found


def other_member_globals(archive: ZipArchive, loaded: list[str], *tables: StorageTable) -> list:
    """Dangerous globals of members torch.load does not unpickle but another loader could (a
    pickle in another folder, under another name): see readers.payloads."""
    from .payloads import zip_member_globals

    skip = set(loaded)
    for table in tables:
        skip.update(table.members)  # C-level: 100k storages, their hashes cached by the directory
    return zip_member_globals(archive, skip, include_shadowed=False)


def _byteorder(archive: ZipArchive, prefix: str) -> str:
    entry = archive.entries.get(f"{prefix}byteorder")
    if entry is None or entry.size > 16:
        return "little"
    value = archive.read(entry.name, 16).decode("ascii", "replace").strip()
    return "big" if value == "big" else "little"


# ----------------------------------------------------------------------------------------------
# TorchScript
# ----------------------------------------------------------------------------------------------
_CLASS = re.compile(r"^class (\w+)\((\w+)\):\s*$", re.M)
# `[ \t]`, not `\s`, before the name: `^\s+` runs across lines, and every blank line of a
# hostile code file restarted it there (16 MB of newlines: quadratic, hours).
_LIST_ATTR = re.compile(r"^[ \t]+(__parameters__|__buffers__) = \[(.*?)\][ \t]*$", re.M)
_FINAL = re.compile(r"^[ \t]+(\w+) : Final\[[\w\[\], ]+\] = (.+)$", re.M)
_MANGLE = re.compile(r"___torch_mangle_\d+\.")


class ScriptClass:
    __slots__ = ("parameters", "buffers", "constants", "has_setstate")

    def __init__(self) -> None:
        self.parameters: set[str] = set()
        self.buffers: set[str] = set()
        self.constants: dict[str, Any] = {}
        self.has_setstate = False


def parse_script_code(archive: ZipArchive, prefix: str, skipped: list[str] | None = None) -> dict[str, ScriptClass]:
    """Class facts from the archive's `code/` sources, read as text (never compiled). Deflated
    sources past the file's inflate budget are not read; their names go to `skipped`."""
    classes: dict[str, ScriptClass] = {}
    code_dir = f"{prefix}code/"
    for name, entry in archive.entries.items():
        if not (name.startswith(code_dir) and name.endswith(".py")):
            continue
        if entry.size > MAX_CODE_BYTES:
            if skipped is not None:
                skipped.append(name)
            continue
        module = name[len(code_dir) : -3].replace("/", ".")
        try:
            text = archive.read(name, MAX_CODE_BYTES).decode("utf-8", "replace")
        except InflateBudgetError:
            if skipped is not None:
                skipped.append(name)
            continue
        matches = list(_CLASS.finditer(text))
        for i, match in enumerate(matches):
            body = text[match.end() : matches[i + 1].start() if i + 1 < len(matches) else len(text)]
            info = ScriptClass()
            for attr in _LIST_ATTR.finditer(body):
                names = {n.strip().strip('"') for n in attr.group(2).split(",") if n.strip()}
                (info.parameters if attr.group(1) == "__parameters__" else info.buffers).update(names)
            for const in _FINAL.finditer(body):
                info.constants[const.group(1)] = _literal(const.group(2).strip())
            info.has_setstate = "def __setstate__(" in body
            classes[f"{module}.{match.group(1)}"] = info
    return classes


def _literal(text: str) -> Any:
    if text in ("True", "False"):
        return text == "True"
    if text == "None":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text[:120]


def script_class_path(qualname: str) -> str:
    """`__torch__.torch.nn.modules.conv.___torch_mangle_3.Conv2d` -> `torch.nn.modules.conv.Conv2d`."""
    name = _MANGLE.sub("", qualname)
    return name[len("__torch__.") :] if name.startswith("__torch__.") else name


def read_torchscript(path: Path, archive: ZipArchive, prefix: str) -> Checkpoint:
    byteorder = _byteorder(archive, prefix)
    # data.pkl first: the pickle is what must be read; code/ sources only add class facts.
    storages = StorageTable(path, archive, f"{prefix}data/", byteorder)
    data = archive.read(f"{prefix}data.pkl", MAX_PICKLE_BYTES, verify=True)
    skipped_code: list[str] = []
    classes = parse_script_code(archive, prefix, skipped_code)

    def scripted(module: str, name: str) -> bool:
        return module == "__torch__" or module.startswith("__torch__.")

    root, globals_, _ = safe_load(
        data, source=f"{path.name}:{prefix}data.pkl", persistent_load=storages.load, known_schema=scripted
    )
    storages.locate()
    ckpt = Checkpoint(path, Format.TORCHSCRIPT, kind="torchscript", files=[path])
    for ref in globals_:
        info = classes.get(ref.qualname)
        if info is not None and info.has_setstate and ref.safety == "safe":
            ref.safety, ref.reason = "unsafe", "scripted __setstate__ runs on torch.jit.load"
    ckpt.globals = globals_
    const_storages = StorageTable(path, archive, f"{prefix}constants/", byteorder)
    const_name = f"{prefix}constants.pkl"
    if const_name in archive.entries:
        constants, const_globals, _ = safe_load(
            archive.read(const_name, MAX_PICKLE_BYTES, verify=True), source=f"{path.name}:{const_name}",
            persistent_load=const_storages.load, known_schema=scripted,
        )  # fmt: skip
        const_storages.locate()
        ckpt.globals.extend(const_globals)
        walker = Walker(ckpt)
        if isinstance(constants, tuple):
            for i, value in enumerate(constants):
                if isinstance(value, TensorRef):
                    walker.add_tensor(value, f"c{i}", "constants", TENSOR)
            if constants:
                ckpt.sections["constants"] = "constants"
    ckpt.metadata["byteorder"] = byteorder
    if archive.duplicates:
        ckpt.problems.append(f"archive has duplicate members: {', '.join(archive.duplicates[:3])}")
        ckpt.globals.extend(shadowed_pickle_globals(path, archive, ckpt.problems))
    loaded = [f"{prefix}data.pkl", const_name]
    ckpt.globals.extend(other_member_globals(archive, loaded, storages, const_storages))
    ckpt.problems.extend(storages.problems + const_storages.problems)
    ckpt.refusals.extend(reference_refusals(archive, prefix))
    if skipped_code:
        ckpt.warnings.append(
            f"{len(skipped_code):,} code file(s) not read (deflated past the file's inflate budget of "
            f"{archive.inflate_budget:,} bytes, or over {MAX_CODE_BYTES:,} bytes): {', '.join(repr(n[:80]) for n in skipped_code[:3])}"
            + (f" and {len(skipped_code) - 3:,} more" if len(skipped_code) > 3 else "")
        )
    _deflated_warning(ckpt, archive)
    ckpt.metadata["code_files"] = sorted(n[len(prefix) :] for n in archive.entries if n.startswith(f"{prefix}code/") and n.endswith(".py"))
    if isinstance(root, Inert):
        ckpt.module_root = _walk_script_module(ckpt, root, classes)
    else:
        ckpt.problems.append("TorchScript archive whose data.pkl is not a module")
    return ckpt


def _walk_script_module(ckpt: Checkpoint, root_obj: Inert, classes: dict[str, ScriptClass]) -> ModuleNode:
    walker = Walker(ckpt)
    root = ModuleNode("")
    stack: list[tuple[Inert, ModuleNode, int]] = [(root_obj, root, 0)]
    seen = {id(root_obj)}
    while stack:
        obj, node, depth = stack.pop()
        info = classes.get(obj.qualname, ScriptClass())
        node.class_path = script_class_path(obj.qualname)
        node.attributes.update(info.constants)
        state = obj.state_dict()
        prefix = f"{node.name}." if node.name else ""
        if state is None:
            state = {}
            if isinstance(obj.state, (tuple, list)):
                # A scripted __getstate__ chose this layout; only its __setstate__ knows the
                # names. List the tensors by position so none of the file's bytes go missing.
                for i, value in enumerate(obj.state):
                    if isinstance(value, TensorRef):
                        node.tensors.append(walker.add_tensor(value, f"{prefix}__getstate__[{i}]", "", TENSOR, True))
                if node.tensors:
                    ckpt.warnings.append(
                        f"module {node.name or '(root)'!r} keeps its state through a scripted __getstate__; "
                        "its tensors are listed by position"
                    )
        children = []
        for key, value in state.items():
            if not isinstance(key, str):
                continue
            if key == "training":
                node.training = value if isinstance(value, bool) else None
            elif isinstance(value, TensorRef):
                kind = PARAMETER if key in info.parameters else BUFFER if key in info.buffers else TENSOR
                node.tensors.append(walker.add_tensor(value, join_name(node.name, key), "", kind, True))
            elif isinstance(value, Inert) and value.qualname.startswith("__torch__"):
                if id(value) not in seen and depth < 200:
                    seen.add(id(value))
                    children.append((value, node.child(key), depth + 1))
            elif key.startswith("_"):
                continue
            elif is_plain(value):
                node.attributes[key] = value
            else:
                node.attributes[key] = walker.describe(value)[1]
        stack.extend(reversed(children))
    return root
