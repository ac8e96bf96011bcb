"""Chunk ranges, the basis of `--dask`'s equality with a local run: `chunk_count` (metadata
only) says how many chunks `TensorChunks.chunks()` yields, `chunks(first, stop)` yields exactly those
chunks of the full sequence, and `plan_jobs` covers every chunk once, in order, by file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelscope_tui.readers import open_checkpoint
from modelscope_tui.values.chunks import TensorChunks, chunk_count
from modelscope_tui.values.cluster import plan_jobs
from modelscope_tui.values.data import TensorData


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ranges") / "views.pt"
    base = torch.arange(60 * 70, dtype=torch.float32).reshape(60, 70) / 7
    torch.save(
        {
            "plain": base,
            "half": base.half(),
            "every_other": base[:, ::2],  # not dense: slabs
            "corner": base[5:37, 3:50],  # not dense, rows cut
            "transposed": base.t(),  # dense, not contiguous
            "deep": torch.arange(4 * 5 * 300, dtype=torch.float64).reshape(4, 5, 300)[:, :, ::3],
            "scalar": torch.tensor(3.5),
            "empty": torch.zeros(0, 4),
        },
        path,
    )
    return open_checkpoint(path)


def _bytes(comps) -> bytes:
    if type(comps) is tuple:  # (address, count, kind, lo, hi): the range itself is the identity
        return repr(comps[:3]).encode()
    return np.ascontiguousarray(comps).tobytes()


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("chunk_bytes", [64, 1000, 4096, 1 << 20])
def test_ranges_are_slices_of_the_full_sequence(ckpt, ordered, chunk_bytes):
    with TensorData() as data:
        for t in ckpt.tensors:
            full = [(n, _bytes(c)) for n, c in TensorChunks(data, t, chunk_bytes, ordered=ordered, native=not ordered).chunks()]
            count = chunk_count(t, chunk_bytes, ordered)
            assert count == len(full), t.name
            assert sum(n for n, _ in full) == t.nbytes
            for step in (1, 2, 3, 7):
                got = []
                for first in range(0, max(count, 1), step):
                    src = TensorChunks(data, t, chunk_bytes, ordered=ordered, native=not ordered)
                    got += [(n, _bytes(c)) for n, c in src.chunks(first, first + step)]
                assert got == full, (t.name, step)


def test_plans_cover_every_chunk_once_in_order():
    items = [(0, 10, "a", 0), (3, 10, "a", 25), (25, 10, "a", 250), (1, 10, "b", 4), (40, 100, "b", 3999), (2, 10, "c", 20)]
    for task_bytes in (1, 35, 100, 1000, 10**6):
        jobs = plan_jobs(items, task_bytes)
        seen = [p for job in jobs for p in job.pieces]
        for i, (count, _per, _file, _n) in enumerate(items):
            ranges = [(f, s) for j, f, s in seen if j == i]
            assert ranges[0][0] == 0 and ranges[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert [j for j, _, _ in seen] == sorted(j for j, _, _ in seen)
        for job in jobs:
            assert len({items[j][2] for j, _, _ in job.pieces}) == 1  # one file (shard) per task
            chunks = sum(s - f for _, f, s in job.pieces)
            budget = sum((s - f) * items[j][1] for j, f, s in job.pieces)
            assert budget <= task_bytes or chunks == 1
        assert sum(job.nbytes for job in jobs) == sum(n for *_, n in items)  # progress ends at 100%
