"""Property: whatever bytes a mutated checkpoint holds, only MscopeError subclasses escape.

Valid samples of every reader's input (torch zip, full module, Lightning, legacy, TorchScript,
safetensors, plain pickle, DCP `.metadata` and `.distcp`, sharded index and shard) are mutated by
hypothesis: bit flips, overwrites, inserts, deletes, truncation, splices from other formats,
corrupted header numbers (zip directory fields, pickle operands, legacy storage counts, the
safetensors length and JSON numbers), with zip CRCs optionally recomputed so the damage reaches
the unpickler. Each case is opened strictly and leniently, summarised, and every tensor is read
through TensorData, under a time limit.

The `ci` profile (default) runs a few hundred cases in seconds and is derandomized; set
MSCOPE_FUZZ_PROFILE=long for a deeper run, or use bench/fuzz_long.py (random, counts outcomes,
writes reproducers, survives hangs and crashes).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile.mutate import INTERESTING, exercise, materialize_case, seeds

settings.register_profile(
    "mscope-ci",
    max_examples=32,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
settings.register_profile(
    "mscope-long",
    max_examples=2_000,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
FUZZ = settings.get_profile(f"mscope-{os.environ.get('MSCOPE_FUZZ_PROFILE', 'ci')}")
SECONDS = 10  # per case; most take milliseconds

POOL = seeds()
SEEDS = {seed.name: seed for seed in POOL}


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def hang(signum, frame):
        raise TimeoutError(f"a case ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def mutations(seed) -> st.SearchStrategy[list[tuple]]:
    n = len(seed.data)
    pos = st.integers(0, n)
    number = st.tuples(
        st.just("number"),
        st.integers(0, max(0, len(seed.sites) - 1)),
        st.one_of(st.sampled_from(INTERESTING), st.integers(-(1 << 16), 1 << 64)),
    )
    op = st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("set"), pos, st.binary(min_size=1, max_size=32)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("delete"), pos, st.sampled_from([1, 2, 8, 64, 1024])),
        st.tuples(st.just("truncate"), pos),
        st.tuples(
            st.just("splice"),
            pos,
            st.integers(0, len(POOL) - 1),
            st.integers(0, 1 << 20),
            st.sampled_from([4, 64, 512, 4096]),
        ),
        number,
        number,
        st.just(("fixcrc",)),
    )
    return st.lists(op, min_size=1, max_size=5)


@pytest.mark.parametrize("name", list(SEEDS))
def test_seed_is_valid(name, tmp_path):
    """Unmutated, every seed opens and every tensor reads: the mutations start from good files."""
    path = materialize_case(SEEDS[name], [], POOL, tmp_path / "case")
    assert exercise(path) == "opened"


@pytest.mark.parametrize("name", list(SEEDS))
def test_mutated_inputs_raise_only_mscope_errors(name, tmp_path):
    seed = SEEDS[name]
    outcomes: list[str] = []

    @FUZZ
    @given(ops=mutations(seed))
    def check(ops: list[tuple]) -> None:
        path = materialize_case(seed, ops, POOL, tmp_path / "case")
        with time_limit(SECONDS):
            outcomes.append(exercise(path))  # anything but an MscopeError fails with `ops`

    check()
    assert outcomes
