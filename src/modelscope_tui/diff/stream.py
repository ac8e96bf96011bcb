"""The diff as a stream, for views that must show something at once: `DiffStream` pairs the
names and decides what metadata alone can (added, removed, shape or dtype changed, unreadable),
then `run()` compares values pair by pair and looks for renames, yielding each result as it is
known; `finish()` gives the DiffReport. `diff_checkpoints` is a stream run to the end.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from itertools import chain
from typing import TYPE_CHECKING

from ..checkpoint import Checkpoint, TensorRecord, dims_key
from ..errors import Cancelled, TensorDataError
from ..values.chunks import LAYOUT
from ..values.data import unreadable_records
from ..values.digest import digest
from ..values.stats import DEFAULT_CHUNK_BYTES, Progress, ProgressFn
from .compare import Dequant, Sums, compare_values, fill, fp8_dequant
from .pairing import (
    llama_cpp_map,
    logical_map,
    prefix_map,
    quant_label,
    quantized_note,
    rotary_heads,
    tensors_by_name,
)
from .report import (
    ADDED,
    DTYPE_CHANGED,
    PENDING,
    REMOVED,
    RENAMED,
    SHAPE_CHANGED,
    UNREADABLE,
    DiffReport,
    Status,
    TensorDiff,
    module_summary,
    stored_requires_grad,
)

if TYPE_CHECKING:
    from ..values.cluster import Cluster


def diff_checkpoints(
    a: Checkpoint,
    b: Checkpoint,
    atol: float = 1e-8,
    rtol: float = 1e-5,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    sections: str = "model",
    detect_renames: bool = True,
    dask: str | None = None,
    names: dict[str, str] | None = None,
) -> DiffReport:
    """Compare the model tensors of A and B (every section's with sections="all").

    Tensors are matched by name; see report.Status (and the package docstring). When `cancel` is
    set the report comes back with `cancelled=True` and the tensors compared so far (and every
    status known from metadata alone). `dask`: the address of a Dask scheduler whose workers
    compare the values (values/cluster.py; the same report); MscopeError when unreachable.
    `names`: an explicit A name -> B name map instead of matching names (see DiffStream).
    """
    stream = DiffStream(a, b, atol, rtol, chunk_bytes, sections, detect_renames, names)
    cluster = None
    if dask is not None and stream.total:
        from ..values.cluster import connect

        cluster = connect(dask)
    try:
        for _ in stream.run(progress, cancel, cluster):
            pass
    finally:
        if cluster is not None:
            cluster.close()
    from ..readers.sources import check_unchanged

    check_unchanged([*a.files, *b.files])  # a remote file replaced mid-run: no mixed report
    return stream.finish()


class DiffStream:
    """A diff in two steps, for views that must show something at once (the explorer).

    Constructing it matches the names and reads no tensor bytes: `metadata` then holds one
    TensorDiff per pair, removed and added tensor, with every status that metadata decides
    (added, removed, shape-changed, dtype-changed, unreadable); pairs whose values are still to be
    compared have `pending=True` (status PENDING, or DTYPE_CHANGED for a cast). `run()` compares
    the values, pair by pair, then looks for renames, and yields each result as it is known: a new
    TensorDiff replacing the pending one with the same names, or a RENAMED one replacing a
    removed + added pair. `finish()` assembles the DiffReport `diff_checkpoints` returns.

    The objects in `metadata` are never changed after construction, so a UI thread may read them
    while `run()` goes on in a worker.
    """

    def __init__(
        self,
        a: Checkpoint,
        b: Checkpoint,
        atol: float = 1e-8,
        rtol: float = 1e-5,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        sections: str = "model",
        detect_renames: bool = True,
        names: dict[str, str] | None = None,
    ) -> None:
        """`names`: A name -> B name, when the caller knows the pairing (convert's --verify:
        stripped prefixes, tied aliases paired with the one copy written); names it maps to
        nothing in B stay removed."""
        self.a, self.b = a, b
        self.chunk_bytes = chunk_bytes
        self.detect_renames = detect_renames
        self.report = DiffReport(a.path, b.path, a.format, b.format, atol, rtol)
        self.a_tensors, self.b_tensors = ta, tb = tensors_by_name(a, sections), tensors_by_name(b, sections)
        # Files are opened strict=False: records whose bytes the reader found outside the file
        # (or past the view budget) are never read, as in audit; they are reported unreadable.
        self._bad = unreadable_records(a) | unreadable_records(b)
        if names is not None:
            mapping, note = {n: m for n, m in names.items() if n in ta and m in tb}, None
            llama, llama_note = {}, None
        else:
            mapping, note = prefix_map(ta, tb)
            llama, llama_note = llama_cpp_map(a, b, ta, tb)
        if len(llama) > len(mapping):
            mapping, note = llama, llama_note
        elif llama_note and not llama:
            self.report.notes.append(llama_note)
        if note:
            self.report.notes.append(note)
        # a quantized weight pairs with its plain original by logical name and shape
        mapping, folded_a, folded_b = logical_map(ta, tb, mapping)
        quantized = quantized_note([(ta[n], tb[m]) for n, m in mapping.items()])
        if quantized:
            self.report.notes.append(quantized)
        # an explicit map pairs tensors as stored (a GGUF converted as is keeps llama.cpp's rows)
        self.unpermute = rotary_heads(a, b, mapping) if names is None else {}
        if self.unpermute:
            self.report.notes.append(
                f"{len(self.unpermute):,} attn_q / attn_k weight(s) compared with their rows back in the Hugging Face "
                "order (llama.cpp's converter permutes them for its rotary layout)"
            )
        mapped_b = set(mapping.values())
        self.removed = [n for n in ta if n not in mapping and n not in folded_a]
        self.added = [n for n in tb if n not in mapped_b and n not in folded_b]
        self.pairs: list[TensorDiff] = []
        self.total = 0  # bytes the value comparison reads (both sides)
        self.dequant: dict[str, Dequant] = {}  # A name -> how its quantized side is dequantized
        self._b_of: dict[str, str] = {}
        self._quantized: list[str] = []  # A names of plain <-> quantized pairs
        for an in ta:
            if an in mapping:
                self.pairs.append(self._pair(an, mapping[an]))
        schemes = sorted(
            {quant_label(r) for an in self._quantized for r in (ta[an], tb[mapping[an]]) if r.quant}
        )  # the pairs _quantized_pair made (GGUF's blocks are compared as any dtype)
        if schemes:
            compared = sorted({quant_label(ta[n] if d.side == "a" else tb[self._b_of[n]]) for n, d in self.dequant.items()})
            rest = [s for s in schemes if s not in compared]
            said = []
            if compared:
                said.append(f"values of {', '.join(compared)} compared dequantized (FP8 value x its block scale, exact)")
            if rest:
                said.append(f"{', '.join(rest)}: values not compared (quantized)")
            if said:
                self.report.notes.append("; ".join(said))
        self._removed = [_one_side(REMOVED, an, ta[an]) for an in self.removed]
        self._added = [_one_side(ADDED, bn, tb[bn]) for bn in self.added]
        self.results: dict[tuple[str | None, str | None], TensorDiff] = {}
        self.renamed: list[TensorDiff] = []
        self.done_bytes = 0
        self.seconds = 0.0

    def _pair(self, an: str, bn: str) -> TensorDiff:
        ra, rb = self.a_tensors[an], self.b_tensors[bn]
        if (ra.quant is None) != (rb.quant is None) and "gguf" not in (
            getattr(ra.quant, "method", ""),
            getattr(rb.quant, "method", ""),
        ):  # GGML blocks are read dequantized already (values/chunks.py): compared as any dtype
            return self._quantized_pair(an, bn, ra, rb)
        d = TensorDiff(
            bn, PENDING, an, bn, tuple(ra.shape), tuple(rb.shape), ra.dtype, rb.dtype, rb.numel,
            a_requires_grad=stored_requires_grad(ra), b_requires_grad=stored_requires_grad(rb),
        )  # fmt: skip
        if ra.shape != rb.shape:
            d.status = SHAPE_CHANGED
            return d
        comparable = (
            ra.dtype in LAYOUT
            and rb.dtype in LAYOUT
            and LAYOUT[ra.dtype].per == LAYOUT[rb.dtype].per
            and ra.storage is not None
            and rb.storage is not None
        )
        if comparable and (id(ra) in self._bad or id(rb) in self._bad):
            d.status = UNREADABLE
            side = "A" if id(ra) in self._bad else "B"
            d.message = f"skipped: its bytes in {side} lie outside the file or past its view budget (see mscope audit)"
            return d
        if not comparable:
            d.status = DTYPE_CHANGED if ra.dtype != rb.dtype else UNREADABLE
            if d.status == UNREADABLE:
                d.message = (
                    f"no values to compare (dtype {ra.dtype}, {ra.note or rb.note or 'no storage'})"
                )
            return d
        if ra.dtype != rb.dtype:
            d.status = DTYPE_CHANGED
        d.pending = True
        if ra.dtype in LAYOUT and rb.dtype in LAYOUT:
            self.total += ra.nbytes + rb.nbytes
        return d

    def _quantized_pair(self, an: str, bn: str, ra: TensorRecord, rb: TensorRecord) -> TensorDiff:
        """A plain weight and its quantized form: logical shapes, the scheme as B's (or A's)
        dtype, values compared only where one numpy multiply dequantizes exactly (FP8 with
        per-tensor, per-channel or block scales)."""
        side, q = ("b", rb) if rb.quant is not None else ("a", ra)
        self._quantized.append(an)
        info = q.quant
        shape_a = info.logical_shape if side == "a" else tuple(ra.shape)
        shape_b = info.logical_shape if side == "b" else tuple(rb.shape)
        d = TensorDiff(
            bn, DTYPE_CHANGED, an, bn, shape_a, shape_b, quant_label(ra), quant_label(rb), info.logical_numel,
            a_requires_grad=stored_requires_grad(ra), b_requires_grad=stored_requires_grad(rb),
        )  # fmt: skip
        way = "quantized to" if side == "b" else "dequantized from"
        if shape_a != shape_b:
            d.status = SHAPE_CHANGED
            return d
        records = self.b_tensors if side == "b" else self.a_tensors
        scale = next((records.get(c) for c in info.companions if c.endswith(("weight_scale_inv", "weight_scale"))), None)
        plain = ra if side == "b" else rb
        dq = None
        if info.method == "fp8" and scale is not None and plain.dtype in LAYOUT and plain.storage is not None:
            dq = fp8_dequant(side, q, scale)
        if dq is None or id(ra) in self._bad or id(rb) in self._bad or id(scale) in self._bad:
            d.message = f"{way} {info.scheme}; values not compared (quantized)"
            return d
        d.message = f"{way} {info.scheme}; values compared dequantized"
        d.pending = True
        self.dequant[an] = dq
        self._b_of[an] = bn
        self.total += ra.nbytes + rb.nbytes
        return d

    @property
    def metadata(self) -> list[TensorDiff]:
        """Pairs (in A's order), then removed, then added: what is known without reading bytes."""
        return self.pairs + self._removed + self._added

    def run(
        self,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        cluster: Cluster | None = None,
    ) -> Iterator[TensorDiff]:
        """Compare values (memory: one chunk per side), yielding each result as it is known;
        with `cluster` (values.cluster.connect) the values are compared by its workers, with
        the same results in the same order.

        On cancel the stream stops and `report.cancelled` is set; the pairs not reached stay
        pending (and are left out of `finish()`'s report)."""
        from ..values.data import TensorData

        t0 = time.perf_counter()
        state = {"last": 0.0}

        def on_bytes(n: int, name: str = "") -> None:
            self.done_bytes += n
            now = time.perf_counter()
            if progress is not None and now - state["last"] >= 0.1:
                state["last"] = now
                progress(Progress(self.done_bytes, self.total, now - t0, name))

        try:
            with TensorData() as da, TensorData() as db:
                todo = [
                    m for m in self.pairs if m.pending and (m.a_name, m.b_name) not in self.results
                ]
                if cluster is not None:
                    # dequantized pairs are compared here: the workers' tasks know no scales
                    local = [m for m in todo if m.a_name in self.dequant]
                    rest = [m for m in todo if m.a_name not in self.dequant]
                    compared = chain(
                        self._compared_on(cluster, rest, progress, cancel),
                        self._compared(da, db, local, cancel, on_bytes),
                    )
                else:
                    da.plan([self.a_tensors[m.a_name] for m in todo])  # remote: ranges in flight
                    db.plan([self.b_tensors[m.b_name] for m in todo])
                    compared = self._compared(da, db, todo, cancel, on_bytes)
                for m, acc in compared:
                    d = _copy(m)
                    d.pending = False
                    if isinstance(acc, TensorDataError):
                        d.status = UNREADABLE
                        d.message = acc.message
                    else:
                        fill(d, acc, m.a_dtype != m.b_dtype)
                    self.results[(m.a_name, m.b_name)] = d
                    yield d
                if self.detect_renames and self.removed and self.added and not self.renamed:
                    for d in self._renames(da, db, cancel, cluster):
                        self.renamed.append(d)
                        yield d
        except Cancelled:
            self.report.cancelled = True
        self.seconds += time.perf_counter() - t0
        if progress is not None:
            progress(Progress(self.done_bytes, self.total, self.seconds, ""))

    def _compared(self, da, db, todo, cancel, on_bytes) -> Iterator[tuple[TensorDiff, Sums | TensorDataError]]:
        for m in todo:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            ra, rb = self.a_tensors[m.a_name], self.b_tensors[m.b_name]
            try:
                acc = compare_values(
                    da, db, ra, rb, self.report.atol, self.report.rtol,
                    self.chunk_bytes, cancel, lambda n, _bn=m.b_name: on_bytes(n, _bn),
                    self.unpermute.get(m.a_name), self.dequant.get(m.a_name),
                )  # fmt: skip
            except TensorDataError as exc:
                yield m, exc
            else:
                yield m, acc

    def _compared_on(self, cluster, todo, progress, cancel) -> Iterator[tuple[TensorDiff, Sums | TensorDataError]]:
        from .cluster import cluster_compare

        pairs = [(self.a_tensors[m.a_name], self.b_tensors[m.b_name]) for m in todo]
        unpermutes = [self.unpermute.get(m.a_name) for m in todo]
        for i, acc in cluster_compare(
            cluster, self.a, self.b, pairs, self.report.atol, self.report.rtol,
            self.chunk_bytes, progress, cancel, unpermutes=unpermutes,
        ):  # fmt: skip
            if not isinstance(acc, TensorDataError):
                ra, rb = pairs[i]
                self.done_bytes += ra.nbytes + rb.nbytes  # what compare_values counts
            yield todo[i], acc

    def finish(self) -> DiffReport:
        """The report: pairs (compared or decided by metadata), removed, added, renamed."""
        report = self.report
        renamed_a = {d.a_name for d in self.renamed}
        renamed_b = {d.b_name for d in self.renamed}
        pairs = [self.results.get((m.a_name, m.b_name), m) for m in self.pairs]
        report.tensors = (
            [d for d in pairs if not d.pending]
            + [d for d in self._removed if d.a_name not in renamed_a]
            + [d for d in self._added if d.b_name not in renamed_b]
            + self.renamed
        )
        report.modules = module_summary(report.tensors)
        report.seconds = self.seconds
        report.bytes_read = self.done_bytes
        return report

    def _renames(self, da, db, cancel, cluster=None) -> Iterator[TensorDiff]:
        """Removed x added with the same shape and dtype, compared by a BLAKE2b of their bytes
        (hashed by the workers of `cluster` when there is one)."""
        ta, tb, chunk_bytes = self.a_tensors, self.b_tensors, self.chunk_bytes
        sig_a: dict[tuple, list[str]] = defaultdict(list)
        sig_b: dict[tuple, list[str]] = defaultdict(list)
        for n in self.removed:
            r = ta[n]
            if r.storage is not None and r.dtype in LAYOUT and id(r) not in self._bad:
                sig_a[(dims_key(r.shape), r.dtype)].append(n)
        for n in self.added:
            r = tb[n]
            if r.storage is not None and r.dtype in LAYOUT and id(r) not in self._bad:
                sig_b[(dims_key(r.shape), r.dtype)].append(n)
        ambiguous = 0
        hashed_a: dict[int, bytes | None] = {}
        hashed_b: dict[int, bytes | None] = {}
        if cluster is not None:  # every candidate hashed by the workers, in one batch per side
            from ..values.cluster import cluster_digests

            both = [sig for sig in sig_a if sig in sig_b]
            hashed_a = cluster_digests(cluster, self.a, [ta[n] for s in both for n in sig_a[s]], chunk_bytes, cancel)
            hashed_b = cluster_digests(cluster, self.b, [tb[n] for s in both for n in sig_b[s]], chunk_bytes, cancel)

        def digests(names: list[str], records: dict, data, hashed: dict) -> dict[bytes, list[str]]:
            out: dict[bytes, list[str]] = defaultdict(list)
            for n in names:
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                if cluster is not None:
                    h = hashed.get(id(records[n]))
                    if h is not None:
                        out[h].append(n)
                    continue
                try:
                    out[digest(data, records[n], chunk_bytes)].append(n)
                except TensorDataError:
                    continue
            return out

        for sig, names_a in sig_a.items():
            names_b = sig_b.get(sig)
            if not names_b:
                continue
            digests_b = digests(names_b, tb, db, hashed_b)
            digests_a = digests(names_a, ta, da, hashed_a)
            # A rename only when the bytes are unique on both sides: equal constant tensors (two
            # BatchNorm weights of all ones) say nothing about which name became which.
            for h, hits_a in digests_a.items():
                hits_b = digests_b.get(h)
                if not hits_b:
                    continue
                if len(hits_a) != 1 or len(hits_b) != 1:
                    ambiguous += len(hits_a) + len(hits_b)
                    continue
                n, bn = hits_a[0], hits_b[0]
                if n in tb or bn in ta:  # the name is on the other side too: not a rename
                    continue
                r = ta[n]
                yield TensorDiff(bn, RENAMED, n, bn, tuple(r.shape), tuple(r.shape), r.dtype, r.dtype, r.numel,
                                 message=f"renamed? {n} -> {bn} (identical bytes)",
                                 a_requires_grad=stored_requires_grad(r),
                                 b_requires_grad=stored_requires_grad(tb[bn]))  # fmt: skip
        if ambiguous:
            self.report.notes.append(
                f"{ambiguous:,} removed/added tensor(s) hold bytes that several of them share "
                "(e.g. constant weights): not reported as renames"
            )


def _one_side(status: Status, name: str, r: TensorRecord) -> TensorDiff:
    flag = stored_requires_grad(r)
    if status == REMOVED:
        return TensorDiff(name, REMOVED, name, None, tuple(r.shape), None, r.dtype, None, r.numel,
                          a_requires_grad=flag)  # fmt: skip
    return TensorDiff(name, ADDED, None, name, None, tuple(r.shape), None, r.dtype, r.numel,
                      b_requires_grad=flag)  # fmt: skip


def _copy(d: TensorDiff) -> TensorDiff:
    return TensorDiff(
        d.name, d.status, d.a_name, d.b_name, d.a_shape, d.b_shape, d.a_dtype, d.b_dtype,
        d.numel, message=d.message, pending=d.pending,
        a_requires_grad=d.a_requires_grad, b_requires_grad=d.b_requires_grad,
    )  # fmt: skip

