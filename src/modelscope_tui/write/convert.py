"""`convert`: any readable checkpoint's model tensors as Hugging Face safetensors, one file or a
sharded set with `model.safetensors.index.json`.

Bytes go straight from the source file to the output (copy_file_range where the kernel can,
else pread/write in COPY_CHUNK pieces): no torch, and no memory beyond one chunk. Views whose
elements are not one run of the file (a transposed or sliced tensor, a big-endian legacy file)
are gathered chunk by chunk through values.chunks; only a --dtype cast (and a gather numpy cannot
do, float8 views) goes through torch, one chunk at a time (cast.write_block).

safetensors refuses tensors that share memory, so a tensor that is the same view of the same
storage as an earlier one (tied embeddings) is written once, and `__metadata__["mscope.tied"]`
maps each alias left out to the name written (the JSON object `{"lm_head.weight":
"embed.weight"}`), the same key `cast` uses. `__metadata__` also names the source by its file
name (never its absolute path: that leaks user and host names into files people publish),
its format and the mscope version.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .. import __version__
from ..checkpoint import BLOCK_DTYPES, DTYPE_ITEMSIZE, FLOATING_DTYPES, Checkpoint, TensorRecord
from ..errors import MscopeError
from ..jsonfile import compact_json, json_bytes
from .atomic import (
    SaveError,
    as_save_error,
    atomic_write,
    atomic_write_set,
    check_unchanged,
    copy_range,
    file_state,
    local_source,
    write_all,
)
from .cast import CAST_TARGETS, TIED_METADATA_KEY, CastBlock, write_block

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD = 5 * 10**9
# safetensors' F4 as its reader gives it (readers.safetensors): torch's float4_e2m1fn_x2, two
# values per byte, last dimension halved. Its bytes copy as they are.
PACKED_F4 = "float4_e2m1fn_x2"  # Hugging Face's default, "5GB"
CHUNK_BYTES = 16 << 20  # a gather or cast holds one chunk in memory
COPY_PIECE = 256 << 20  # copy_file_range pieces (no memory): few calls, progress still moves
# A cast result is accepted by --verify when every value is within the target's rounding
# (half an ulp, so 2**-9 relative for bf16, 2**-12 for fp16, with margin) or underflows.
# Codes mscope reads but the safetensors library refuses to load (its Dtype enum has no C128).
NOT_LOADABLE = frozenset({"complex128"})
VERIFY_TOLERANCE = {
    "bfloat16": (1e-38, 2**-8),
    "float16": (2**-24, 2**-10),
    "float32": (1e-45, 2**-23),
}


@dataclass(slots=True)
class OutTensor:
    name: str  # in the output
    record: TensorRecord  # where its bytes come from
    dtype: str  # written dtype

    @property
    def nbytes(self) -> int:
        return self.record.numel * DTYPE_ITEMSIZE[self.dtype]

    @property
    def cast(self) -> bool:
        return self.dtype != self.record.dtype


@dataclass(slots=True)
class Shard:
    name: str
    tensors: list[OutTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class ConvertPlan:
    """What `convert` writes, decided from metadata alone (no tensor bytes, no torch)."""

    shards: list[Shard]
    tied: dict[str, str]  # output alias (not written) -> output name written
    names: dict[str, str]  # source name -> output name (aliases too): --verify pairs by it
    dtype: str | None
    cast_count: int
    metadata: dict[str, str]
    dropped: list[str] = field(default_factory=list)  # non-model parts not converted (sections)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def tensor_count(self) -> int:
        return sum(len(s.tensors) for s in self.shards)


@dataclass
class ConvertResult:
    plan: ConvertPlan
    files: list[Path]  # shards, then the index when there is one
    opened: Path  # what to open to read the result (the file, or the index)
    seconds: float


def _dangerous_globals(ckpt: Checkpoint) -> list[str]:
    from ..readers.payloads import dangerous

    return [g.qualname for g in dangerous(ckpt.globals)]


def plan_convert(
    ckpt: Checkpoint,
    *,
    dtype: str | None = None,
    strip_prefix: str | None = None,
    max_shard_size: int | None = None,
    sharded: bool = True,
    allow_dangerous: bool = False,
) -> ConvertPlan:
    """The shards, names and dtypes `convert` writes; SaveError for what it cannot write.

    dtype: cast floating-point tensors (only) to bf16 / fp16 / fp32. strip_prefix: remove it from
    the names that start with it. max_shard_size: bytes per shard (a bigger tensor gets a shard of
    its own, as in transformers); sharded=False writes one file whatever the size."""
    from ..readers.safetensors import SAFETENSORS_DTYPES

    path = Path(ckpt.path)
    bad = _dangerous_globals(ckpt)
    if bad and not allow_dangerous:
        listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise SaveError(
            f"the file's pickle names dangerous globals ({listed}); not converted",
            path,
            "mscope never runs them; --force converts its tensors anyway",
        )
    target = None
    if dtype is not None:
        target = CAST_TARGETS.get(str(dtype).lower())
        if target is None:
            raise SaveError(f"cannot cast to {str(dtype)[:40]!r}; choose bf16, fp16 or fp32", path)
    records = ckpt.model_tensors
    if not records:
        raise SaveError("the file holds no model tensors to convert", path)
    codes = {v: k for k, v in SAFETENSORS_DTYPES.items()} | {PACKED_F4: "F4"}
    by_qualified = {r.qualified_name: r for r in records}
    names: dict[str, str] = {}
    seen: dict[str, str] = {}
    out: list[OutTensor] = []
    tied: dict[str, str] = {}
    stripped = 0
    for r in records:
        name = r.name
        if strip_prefix and name.startswith(strip_prefix) and len(name) > len(strip_prefix):
            name = name[len(strip_prefix) :]
            stripped += 1
        if name in seen:
            raise SaveError(
                f"two tensors would both be named {name[:80]!r} ({seen[name][:80]!r} and {r.name[:80]!r})",
                path,
            )
        seen[name] = r.name
        names[r.name] = name
        target_rec = by_qualified.get(r.alias_of) if r.alias_of else None
        if target_rec is not None and target_rec.name in names:
            tied[name] = names[target_rec.name]  # same storage and view: written once
            continue
        _check_copyable(r, path)
        out_dtype = target if target is not None and r.dtype in FLOATING_DTYPES else r.dtype
        if out_dtype not in codes or out_dtype in NOT_LOADABLE:
            raise SaveError(
                f"safetensors has no dtype for tensor {r.name[:80]!r} ({out_dtype})",
                path,
                "drop it or change its dtype, then convert",
            )
        out.append(OutTensor(name, r, out_dtype))
    if strip_prefix and not stripped:
        raise SaveError(
            f"no tensor name starts with {strip_prefix[:60]!r}",
            path,
            f"names look like {records[0].name[:60]!r}",
        )
    limit = max_shard_size if sharded and max_shard_size else None
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in out:
        if limit is not None and groups[-1] and size + t.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    shards = [
        Shard(SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors", g)
        for i, g in enumerate(groups)
    ]
    metadata = _metadata(ckpt, target, strip_prefix, tied)
    dropped = sorted({t.section for t in ckpt.tensors if t.section})
    cast_count = sum(1 for t in out if t.cast)
    return ConvertPlan(shards, tied, names, target, cast_count, metadata, dropped)


def _check_copyable(r: TensorRecord, path: Path) -> None:
    s = r.storage
    if r.dtype in BLOCK_DTYPES:
        raise SaveError(
            f"tensor {r.name[:80]!r} is GGML {r.dtype} (block-quantized); convert writes plain dtypes only",
            path,
            "dequantize it with llama.cpp's tools first",
        )
    if (r.note is not None and r.dtype != PACKED_F4) or s is None:
        raise SaveError(
            f"tensor {r.name[:80]!r} ({r.note or 'no storage'}) cannot be converted", path
        )
    if r.dtype not in DTYPE_ITEMSIZE:
        raise SaveError(f"tensor {r.name[:80]!r} is {r.dtype}, which cannot be converted", path)
    if s.file is None or s.data_offset is None:
        raise SaveError(f"the bytes of tensor {r.name[:80]!r} are missing from the file", path)
    if s.compressed:
        raise SaveError(
            f"the bytes of tensor {r.name[:80]!r} are compressed in the archive",
            path,
            "re-save it with torch",
        )


def _metadata(
    ckpt: Checkpoint, dtype: str | None, strip_prefix: str | None, tied: dict[str, str]
) -> dict[str, str]:
    meta: dict[str, str] = {}
    source = ckpt.metadata.get("safetensors_metadata")
    if isinstance(source, dict):  # what a safetensors source said about itself stays
        meta.update(
            {
                k: v
                for k, v in source.items()
                if isinstance(k, str) and isinstance(v, str) and not k.startswith("mscope.")
            }
        )
    meta["format"] = "pt"
    meta["mscope.source"] = Path(ckpt.path).name
    meta["mscope.source_format"] = str(ckpt.format)
    meta["mscope.version"] = __version__
    if dtype is not None:
        meta["mscope.dtype"] = dtype
    if strip_prefix:
        meta["mscope.strip_prefix"] = strip_prefix
    if tied:
        meta[TIED_METADATA_KEY] = compact_json(tied)
    return meta


def safetensors_header(shard: Shard, metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header of one output file (padded to 8 bytes, as safetensors does)."""
    from ..readers.safetensors import SAFETENSORS_DTYPES

    codes = {v: k for k, v in SAFETENSORS_DTYPES.items()} | {PACKED_F4: "F4"}
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for t in shard.tensors:
        shape = list(t.record.shape)
        if t.dtype == PACKED_F4:  # safetensors counts F4 values: two per byte of torch's x2 dtype
            shape[-1] *= 2
        header[t.name] = {
            "dtype": codes[t.dtype],
            "shape": shape,
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json_bytes(header, separators=(",", ":"))
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class _Copier:
    """Moves each output tensor's bytes into the open output file, counting progress."""

    def __init__(self, data: Any, progress: Callable[[Any], None] | None, total: int) -> None:
        self.data = data
        self.fds: dict[Any, int] = {}
        self.progress = progress
        self.total = total
        self.done = 0
        self.t0 = time.perf_counter()
        self.last = 0.0

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _fd(self, file: Any) -> int:
        fd = self.fds.get(file)
        if fd is None:
            fd = self.fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def _tick(self, n: int, name: str) -> None:
        self.done += n
        now = time.perf_counter()
        if self.progress is not None and (now - self.last >= 0.1 or self.done == self.total):
            from ..values.stats import Progress

            self.last = now
            self.progress(Progress(self.done, self.total, now - self.t0, name))

    def write(self, fh: BinaryIO, t: OutTensor) -> None:
        from ..values.chunks import LAYOUT, TensorChunks
        from ..values.data import check_view

        r = t.record
        written = 0
        if r.numel == 0:
            return
        s = r.storage
        fh.flush()
        fd = fh.fileno()

        def sink(piece: Any) -> None:
            nonlocal written
            write_all(fd, piece)
            written += len(piece)
            self._tick(len(piece), t.name)

        if t.cast:
            write_block(sink, self.data, CastBlock(r, r.dtype, t.dtype, r.numel))
        elif r.is_contiguous and s.byteorder != "big":
            raw = self.data.storage_bytes(r)  # checks the storage against the file (truncation)
            check_view(r, len(raw))
            del raw
            start = s.data_offset + r.storage_offset * r.itemsize
            src = self._fd(s.file)
            for pos in range(0, r.nbytes, COPY_PIECE):
                n = min(COPY_PIECE, r.nbytes - pos)
                copy_range(src, fd, start + pos, n)
                written += n
                self._tick(n, t.name)
        elif LAYOUT.get(r.dtype, (None, None, "torch"))[2] not in ("torch", "ggml"):
            # components in row-major order, byte-swapped when the file is big-endian
            for _, comps in TensorChunks(self.data, r, CHUNK_BYTES, ordered=True).chunks():
                sink(memoryview(comps).cast("B"))
        else:  # a gather numpy cannot do (float8 views): torch, one chunk at a time
            write_block(sink, self.data, CastBlock(r, r.dtype, r.dtype, r.numel))
        if written != t.nbytes:
            raise SaveError(f"tensor {r.name[:80]!r} came out {written:,} bytes, not {t.nbytes:,}")


def convert(
    ckpt: Checkpoint,
    dest: str | os.PathLike,
    *,
    dtype: str | None = None,
    strip_prefix: str | None = None,
    max_shard_size: int | None = None,
    overwrite: bool = False,
    allow_dangerous: bool = False,
    progress: Callable[[Any], None] | None = None,
) -> ConvertResult:
    """Write the model tensors of `ckpt` as safetensors at `dest`.

    `dest` ending in `.safetensors`: one file (no sharding). Otherwise a directory (made if
    missing) holding `model.safetensors`, or shards of at most `max_shard_size` bytes (default
    5 GB) and `model.safetensors.index.json`. Every file is written to a temp name first and
    renamed once all are complete, the index last: a failure leaves no output. An existing
    output file is replaced only with `overwrite` (then kept as `.bak`)."""
    source = local_source(ckpt.path)  # bytes are copied from the file: a URL says to download first
    dest = Path(dest)
    single = dest.suffix == ".safetensors"
    if single and max_shard_size:
        raise SaveError(
            "--max-shard-size needs a directory as the destination",
            dest,
            "name a directory, not a .safetensors file",
        )
    plan = plan_convert(
        ckpt,
        dtype=dtype,
        strip_prefix=strip_prefix,
        max_shard_size=max_shard_size or DEFAULT_MAX_SHARD,
        sharded=not single,
        allow_dangerous=allow_dangerous,
    )
    if not single:
        if dest.exists() and not dest.is_dir():
            raise SaveError(
                "destination exists and is not a directory",
                dest,
                "name a new directory or a .safetensors file",
            )
        if dest.is_dir() and not overwrite:
            old = sorted(
                p.name for p in dest.iterdir() if p.name.endswith((".safetensors", ".index.json"))
            )
            if old:
                raise SaveError(
                    f"the directory already holds {old[0]}",
                    dest,
                    "choose a new directory, or --force to replace (with .bak copies)",
                )
    files = {Path(t.record.storage.file) for s in plan.shards for t in s.tensors}
    before = file_state(files)
    t0 = time.perf_counter()
    made_dir = False
    if not single and not dest.exists():
        try:
            dest.mkdir(parents=True)
        except OSError as exc:
            raise SaveError(f"cannot make the directory: {exc.strerror or exc}", dest) from exc
        made_dir = True
    from ..values.data import TensorData

    data = TensorData()
    copier = _Copier(data, progress, plan.total_bytes)

    def shard_writer(shard: Shard) -> Callable[[BinaryIO], None]:
        header = safetensors_header(shard, plan.metadata)

        def write(fh: BinaryIO) -> None:
            try:
                fh.write(header)
                for t in shard.tensors:
                    copier.write(fh, t)
            except MscopeError as exc:
                raise as_save_error(exc, source) from exc
            except RuntimeError as exc:  # torch refusing a conversion
                raise SaveError(
                    f"convert failed: {' '.join(str(exc).split())[:120]}", source
                ) from exc
            check_unchanged(before)

        return write

    try:
        if single:
            atomic_write(dest, shard_writer(plan.shards[0]), overwrite=overwrite)
            written, opened = [dest], dest
        else:
            items = [(dest / s.name, shard_writer(s)) for s in plan.shards]
            if len(plan.shards) > 1:
                index = _index_json(plan)
                items.append((dest / INDEX_NAME, lambda fh: fh.write(index)))
            written = atomic_write_set(items, overwrite=overwrite)
            opened = written[-1]
    except BaseException:
        if made_dir:
            try:
                dest.rmdir()  # only if still empty: nothing of ours is left in it
            except OSError:
                pass
        raise
    finally:
        copier.close()
        data.close()
    return ConvertResult(plan, written, opened, time.perf_counter() - t0)


def _index_json(plan: ConvertPlan) -> bytes:
    meta: dict[str, Any] = {"total_size": plan.total_bytes}
    meta.update(plan.metadata)
    weight_map = {t.name: s.name for s in plan.shards for t in s.tensors}
    return json_bytes({"metadata": meta, "weight_map": weight_map}, indent=2) + b"\n"


@dataclass
class VerifyResult:
    ok: bool
    report: Any  # diff.report.DiffReport
    failures: list[str]  # one line per tensor that does not match


def _same_raw_bytes(a: Checkpoint, b: Checkpoint, a_name: str | None, b_name: str | None) -> bool:
    """Whether two contiguous tensors of one dtype and shape hold the same bytes: the check for
    dtypes whose values mscope cannot read (safetensors' F4), which convert copies as they are."""
    from ..values.data import TensorData

    ra, rb = a.tensor(a_name or ""), b.tensor(b_name or "")
    if ra is None or rb is None or (ra.dtype, ra.shape) != (rb.dtype, rb.shape):
        return False
    if not (ra.is_contiguous and rb.is_contiguous) or ra.storage is None or rb.storage is None:
        return False
    try:
        with TensorData() as data:
            pa, pb = data.storage_bytes(ra), data.storage_bytes(rb)
            sa, sb = ra.storage_offset * ra.itemsize, rb.storage_offset * rb.itemsize
            return pa[sa : sa + ra.nbytes] == pb[sb : sb + rb.nbytes]
    except MscopeError:
        return False


def verify_convert(
    ckpt: Checkpoint, result: ConvertResult, progress: Callable[[Any], None] | None = None
) -> VerifyResult:
    """A diff of the source and the result, paired through the plan's names (aliases against the
    one copy written): bit-exact without a cast; with one, every value within the target's
    rounding (VERIFY_TOLERANCE), integers and others unchanged."""
    from ..diff.report import Status
    from ..diff.stream import diff_checkpoints
    from ..readers import open_checkpoint

    plan = result.plan
    out = open_checkpoint(result.opened)
    names = {src: plan.tied.get(dst, dst) for src, dst in plan.names.items()}
    atol, rtol = VERIFY_TOLERANCE.get(plan.dtype or "", (0.0, 0.0))
    report = diff_checkpoints(
        ckpt, out, atol=atol, rtol=rtol, progress=progress, detect_renames=False, names=names
    )
    failures = []
    for d in report.tensors:
        if d.status == Status.IDENTICAL:
            continue
        if d.status == Status.UNREADABLE and _same_raw_bytes(ckpt, out, d.a_name, d.b_name):
            continue  # values diff cannot read (F4 pairs), copied byte for byte
        cast_ok = (
            d.status == Status.DTYPE_CHANGED
            and plan.dtype is not None
            and d.b_dtype == plan.dtype
            and d.mismatched == 0
        )
        if not cast_ok:
            what = d.message or d.status
            if d.mismatched:
                what = f"{what}: {d.mismatched:,} value(s) differ (max {d.max_abs:.3g})"
            failures.append(f"{d.a_name or d.name}: {what}")
    if report.cancelled:
        failures.append("the comparison was cancelled")
    return VerifyResult(not failures, report, failures)
