"""The value layer's chunk kernels (values/kernels.py) against torch's own reductions (float64), chunk by chunk.

Each kernel test runs on every backend: numpy, the compiled one-pass kernel (statkernel.c) with
its AVX2 loop where the CPU has one, and the same library forced onto its portable C loop.

Every half-precision path is hit on purpose: bf16's int32-pair widening (even count, 4-byte
aligned), its fallback (odd count, a buffer 2 bytes off alignment), chunks with NaN / Inf (the
exact slow path), -0.0, subnormals, the largest finite values, all-negative and all-positive
chunks, and a mean much larger than the spread (re-centred moments).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from modelscope_tui.values import kernels, statkernel
from modelscope_tui.values.stream import default_threads, stream_stats
from statref import reference

HALF = {"f16": torch.float16, "bf16": torch.bfloat16}


BACKENDS = ["numpy", "native", "portable"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Point the kernels at one backend for the test (the library is built by `pip install -e .`)."""
    if request.param == "numpy":
        kernel = None
    else:
        kernel = statkernel.load(portable=request.param == "portable")
        assert kernel is not None, f"{statkernel.LIBRARY} is not built: run pip install -e ."
    monkeypatch.setattr(kernels, "compiled", kernel)
    return request.param


def test_native_kernel_is_built_and_current():
    """pip install builds the library (hatch_build.py); a missing compiler would cost 3x speed."""
    kernel = statkernel.load()
    assert kernel is not None
    assert kernels.compiled_kernel() is kernel
    if os.uname().machine in ("x86_64", "AMD64"):
        flags = open("/proc/cpuinfo").read()
        if all(f" {f}" in flags for f in ("avx2", "fma", "f16c")):
            assert kernel.isa == "AVX2"


def test_native_kernel_is_not_loaded_when_disabled(monkeypatch):
    monkeypatch.setenv("MSCOPE_STATS_KERNEL", "numpy")
    monkeypatch.setattr(statkernel, "_loaded", {})
    assert statkernel.load() is None


def check(part: kernels.Part, x: torch.Tensor, rel: float = 1e-6) -> None:
    ref = reference(x)
    assert (part.n, part.zeros, part.nan, part.inf, part.finite) == (
        x.numel(), ref["zeros"], ref["nan"], ref["inf"], ref["finite"],
    )  # fmt: skip
    assert (part.mn, part.mx) == (ref["min"], ref["max"])  # exact
    if not ref["finite"]:
        return
    rms = math.sqrt(ref["sumsq"] / ref["finite"]) or 1.0
    assert math.isclose(part.mean, ref["mean"], rel_tol=rel, abs_tol=rel * rms)
    assert math.isclose(part.sumsq, ref["sumsq"], rel_tol=rel)
    var = part.m2 / part.finite
    assert math.isclose(var, ref["var"], rel_tol=10 * rel, abs_tol=rel * rms * rms)


def bits(x: torch.Tensor) -> np.ndarray:
    return x.reshape(-1).view(torch.int16).numpy()


def special(dtype: torch.dtype) -> torch.Tensor:
    f = torch.finfo(dtype)
    return torch.tensor(
        [0.0, -0.0, f.tiny, -f.tiny, f.smallest_normal / 4, -f.smallest_normal / 8,
         f.max, -f.max, 1.0, -1.0, 2.5, -0.375],
        dtype=torch.float32,
    ).to(dtype)  # fmt: skip


def subnormals(dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Every value with a zero exponent field (both signs, zero included)."""
    mant = 1023 if dtype == torch.float16 else 127
    m = torch.randint(0, mant + 1, (5_000,), generator=g, dtype=torch.int32)
    sign = torch.randint(0, 2, (5_000,), generator=g, dtype=torch.int32) << 15
    u = m | sign
    return (u - (u >= 32768).to(torch.int32) * 65536).to(torch.int16).view(dtype)


def nans(dtype: torch.dtype) -> torch.Tensor:
    """Quiet and signalling NaNs of both signs (np.fmin.reduce mishandles the signalling ones)."""
    exp = 0x7C00 if dtype == torch.float16 else 0x7F80
    quiet = 0x0200 if dtype == torch.float16 else 0x0040
    pats = [exp | 1, exp | quiet, exp | quiet | 5, exp | 3, 0x8000 | exp | 1, 0x8000 | exp | quiet]
    return torch.tensor([p - 65536 if p >= 32768 else p for p in pats], dtype=torch.int16).view(
        dtype
    )


def cases(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    normal = (torch.randn(10_000, generator=g) * 0.02).to(dtype)
    sp = special(dtype)
    nan_inf = torch.cat(
        [normal[:500], torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype)]
    )
    return {
        "normal": normal,
        "odd": normal[:9_999],
        "special": sp,
        "special_odd": sp[:-1],
        "mixed": torch.cat([normal[:3_000], sp.repeat(50)]),
        "nan_inf": nan_inf,
        "only_nan": torch.full((6,), float("nan")).to(dtype),
        "negative": -(torch.rand(4_096, generator=g) + 0.01).to(dtype),
        "positive": (torch.rand(4_097, generator=g) + 0.01).to(dtype),
        "neg_zero_only": torch.full((8,), -0.0).to(dtype),
        "zeros": torch.zeros(10, dtype=dtype),
        "layernorm": (1 + 1e-3 * torch.randn(20_000, generator=g)).to(dtype),
        "subnormals": subnormals(dtype, g),
        "nan_payloads": torch.cat([normal[:40], nans(dtype), sp]),
        "one": torch.tensor([-3.0]).to(dtype),
    }


@pytest.mark.parametrize("kernel", ["f16", "bf16"])
def test_half_kernel_matches_torch(kernel, backend):
    for name, x in cases(HALF[kernel]).items():
        try:
            check(kernels.chunk_part(bits(x), kernel), x)
        except AssertionError as exc:
            raise AssertionError(f"{kernel} {name}: {exc}") from exc


@pytest.mark.parametrize("kernel", ["f16", "bf16"])
def test_half_kernel_on_an_unaligned_buffer(kernel, backend):
    """A chunk that starts 2 bytes into a word (safetensors offsets only promise 2 for fp16)."""
    x = cases(HALF[kernel])["mixed"]
    raw = np.zeros(2 * x.numel() + 2, dtype=np.uint8)
    raw[2:] = bits(x).view(np.uint8)
    chunk = raw[2:].view(np.int16)
    assert chunk.ctypes.data % 4 == 2
    check(kernels.chunk_part(chunk, kernel), x)


@pytest.mark.parametrize("kernel", ["f16", "bf16"])
def test_pair_widening_gives_the_same_values(kernel):
    """The int32-pair widening equals the ordered one up to order, bit for bit, for every finite
    16-bit pattern (and keeps -0.0)."""
    pattern = np.arange(65536, dtype=np.uint16).view(np.int16)
    exp = kernels.HALF_EXP[kernel]
    finite = pattern[(pattern.view(np.uint16) & exp) != exp].copy()
    ordered = kernels.widen_half(finite, kernel, np.empty(finite.size, np.float32))
    paired = kernels.widen_half_unordered(finite, kernel, np.empty(finite.size, np.float32))
    assert np.array_equal(np.sort(ordered.view(np.int32)), np.sort(paired.view(np.int32)))
    want = torch.from_numpy(finite).view(HALF[kernel]).float().numpy()
    assert np.array_equal(ordered.view(np.int32), want.view(np.int32))


@pytest.mark.parametrize("kernel", ["f16", "bf16"])
def test_half_kernel_many_chunks_accumulate_in_float64(kernel, backend):
    """2M values in 64 KB chunks merged with Chan's formula: mean and std to 1e-6 of float64."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2_000_000, generator=g) * 0.02 + 0.003).to(HALF[kernel])
    raw = bits(x)
    total = kernels.Part()
    for s in range(0, raw.size, 32768):
        total.merge(kernels.chunk_part(raw[s : s + 32768], kernel))
    check(total, x)


def test_default_threads_counts_cores():
    n = default_threads()
    assert 1 <= n <= 8


def test_float_kernel_signalling_nan_and_tiny_values(backend):
    """float32 / float64 chunks: signalling NaNs do not hide the min / max, and values whose
    float32 squares underflow still give an exact norm."""
    snan = np.array([0x7F800001, 0xFF800005, 0x7FC00000], dtype=np.uint32).view(np.float32)
    for values in (
        np.concatenate([np.float32([3.0, 1e-30, -2.0]), snan, np.float32([0.5, -0.0, 7.0])]),
        np.float32([1e-30, -3e-39, 2e-41, 0.0, 5e-25]),  # squares far below float32's range
        np.float32([1e-30, np.inf, 2e-41]),
    ):
        for dtype in (np.float32, np.float64):
            with np.errstate(invalid="ignore"):  # casting a signalling NaN quiets it
                chunk = values.astype(dtype)
            check(kernels.chunk_part(chunk, "float"), torch.from_numpy(chunk.copy()))


def test_stream_threads_match_one_thread_and_skip_unreadable_tensors(tmp_path):
    """The thread pool (tasks of several chunks, small tensors sharing a task) gives the numbers
    of the single-thread path bit for bit, in the same order, and a tensor whose bytes fail is
    reported once and skipped while the rest goes on."""
    from safetensors.torch import save_file

    from modelscope_tui.errors import TensorDataError
    from modelscope_tui.readers import open_checkpoint
    from modelscope_tui.values.data import TensorData

    g = torch.Generator().manual_seed(2)
    tensors = {f"t{i:02d}": torch.randn(300 + 97 * i, generator=g).half() for i in range(20)}
    tensors["big"] = torch.randn(50_000, generator=g).bfloat16()
    tensors["f32"] = torch.randn(7_000, generator=g)
    tensors["empty"] = torch.zeros(0)
    save_file(tensors, tmp_path / "m.safetensors")
    records = open_checkpoint(tmp_path / "m.safetensors").tensors
    broken = {"t07", "big"}

    class Flaky(TensorData):
        def _locate(self, record):  # under storage_bytes and storage_address alike
            if record.name in broken:
                raise TensorDataError(f"{record.name} is gone")
            return super()._locate(record)

    runs = []
    for threads in (1, 2, 3):
        errors: list[str] = []
        with Flaky() as data:
            stream = stream_stats(
                data,
                records,
                4096,
                threads=threads,
                on_error=lambda r, e, out=errors: out.append(r.name),
            )
            got = [(r.name, st.to_dict()) for r, st in stream]
        runs.append((got, errors))
    assert runs[0] == runs[1] == runs[2]
    got, errors = runs[0]
    assert sorted(errors) == sorted(broken)
    assert [name for name, _ in got] == [r.name for r in records if r.name not in broken]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_kernels_across_block_edges(dtype, backend):
    """Sizes around the compiled kernel's 2,048-value blocks and 16-value vector steps, a NaN
    only in a later block, float32 values whose float32 sum overflows, and a mean 1e4 times
    the spread: every backend gives torch's numbers."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(9_000, generator=g)
    f = torch.finfo(dtype)
    xs = {f"n{n}": (base[:n] * 0.05).to(dtype) for n in (1, 15, 16, 17, 2047, 2048, 2049, 4111)}
    late_nan = (base[:5_000] * 0.05).to(dtype)
    late_nan[4_500] = float("nan")
    late_nan[4_501] = -float("inf")
    xs["late_nan"] = late_nan
    xs["huge"] = (torch.rand(3_000, generator=g) * 0.5 + 0.5).to(dtype) * f.max
    xs["offset"] = (300 + 0.03 * base[:6_000]).to(dtype)
    xs["huge_neg"] = -(torch.rand(2_100, generator=g) + 1).to(dtype) * (f.max / 4)
    for name, x in xs.items():
        chunk = bits(x) if dtype != torch.float32 else x.numpy()
        kernel = {torch.float16: "f16", torch.bfloat16: "bf16"}.get(dtype, "float")
        try:
            check(kernels.chunk_part(chunk, kernel), x.float())
        except AssertionError as exc:
            raise AssertionError(f"{dtype} {name}: {exc}") from exc


def test_float32_cases_match_torch(backend):
    """The half-precision special cases, in float32 (the compiled kernel's third loop)."""
    for name, x in cases(torch.float32).items():
        try:
            check(kernels.chunk_part(x.numpy(), "float"), x)
        except AssertionError as exc:
            raise AssertionError(f"float32 {name}: {exc}") from exc


@pytest.mark.parametrize("kernel", ["f16", "bf16", "float"])
def test_compiled_kernel_agrees_with_numpy_on_random_chunks(kernel):
    """Differential check: random lengths across block edges, random scales and offsets, and
    NaN / Inf / zeros sprinkled at random: the compiled kernel (both loops) and numpy give the
    same counts and min / max exactly, and the same moments to 1e-6 of the RMS."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    native = statkernel.load()
    portable = statkernel.load(portable=True)
    assert native is not None and portable is not None
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}[kernel]

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(
        n=st.integers(1, 5000),
        scale=st.sampled_from([1e-3, 0.02, 1.0, 300.0]),
        offset=st.sampled_from([0.0, 1.0, -5.0]),
        specials=st.lists(st.sampled_from(["nan", "inf", "-inf", "0", "-0"]), max_size=4),
        seed=st.integers(0, 2**16),
    )
    def check_one(n, scale, offset, specials, seed):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(n, generator=g) * scale + offset).to(dtype)
        for i, s in enumerate(specials):
            x[(i * 7919 + seed) % n] = float(s)
        chunk = x.numpy() if kernel == "float" else bits(x)
        parts = []
        try:
            for backend in (None, native, portable):
                kernels.compiled = backend
                parts.append(kernels.chunk_part(chunk, kernel))
        finally:
            kernels.compiled = False  # loaded again on next use
        ref = reference(x)
        rms = math.sqrt(ref["sumsq"] / ref["finite"]) if ref["finite"] else 1.0
        for p in parts:
            assert (p.n, p.zeros, p.nan, p.inf, p.finite) == (n, ref["zeros"], ref["nan"], ref["inf"], ref["finite"])
            assert (p.mn, p.mx) == (ref["min"], ref["max"])
            if ref["finite"]:
                assert math.isclose(p.mean, ref["mean"], rel_tol=1e-6, abs_tol=1e-6 * rms)
                assert math.isclose(p.sumsq, ref["sumsq"], rel_tol=1e-6)
                assert math.isclose(p.m2 / p.finite, ref["var"], rel_tol=1e-5, abs_tol=1e-6 * rms * rms)

    check_one()
