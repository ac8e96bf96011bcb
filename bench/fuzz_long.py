"""Long mutation-fuzzing run of every reader (the deep counterpart of tests/unit/test_fuzz.py).

    python bench/fuzz_long.py --minutes 10 [--jobs 2] [--seed 0] [--out bench/_data/fuzz]
    python bench/fuzz_long.py --replay bench/_data/fuzz/00001-legacy    # rerun one reproducer

Cases are random mutations (tests/hostile/mutate.py) of valid sample checkpoints and, for the
--grammar share of them, pickles generated opcode by opcode (tests/hostile/grammar.py: BUILD,
SETITEM on module globals, deep nests, memo tricks, gadget calls, hostile tensor records, cut or
corrupted endings), as plain pickles or inside torch zips. Worker processes
open each case strictly and leniently, render its summary and read every tensor; the parent hands
out cases, kills a worker that takes longer than --timeout (a hang) or dies (a crash), and writes
every case that ended in anything but an MscopeError as a reproducer: the mutated checkpoint and
`ops.txt`. Workers run under an address-space limit (--memory-gb) so a runaway allocation fails
instead of taking the machine. Prints the number of cases, outcomes, errors by type and every
non-MscopeError with its reproducer.
"""

from __future__ import annotations

import argparse
import ast
import collections
import multiprocessing as mp
import random
import resource
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "hostile"))

from grammar import random_case  # noqa: E402

from hostile.mutate import exercise, materialize_case, random_ops, seeds  # noqa: E402

GRAMMAR = -1  # the seed index of a grammar job: (GRAMMAR, case seed)


def worker(conn, memory_gb: float) -> None:
    if memory_gb:
        limit = int(memory_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    pool = seeds()
    tmp = Path(tempfile.mkdtemp(prefix="mscope-fuzz-"))
    try:
        while True:
            job = conn.recv()
            if job is None:
                return
            index, ops = job
            start = time.perf_counter()
            try:  # building the case is the harness's job: its failures are not mscope's
                if index == GRAMMAR:
                    shutil.rmtree(tmp / "grammar", ignore_errors=True)
                    path = random_case(ops, tmp / "grammar")
                else:
                    path = materialize_case(pool[index], ops, pool, tmp / "case")
            except Exception as exc:
                conn.send((f"HARNESS {type(exc).__name__}", "".join(traceback.format_exception(exc))[-1500:], 0.0))
                continue
            try:
                outcome, detail = exercise(path), ""
            except Exception as exc:  # the finding: anything but an MscopeError
                outcome = f"BUG {type(exc).__name__}"
                detail = "".join(traceback.format_exception(exc))[-3000:]
            conn.send((outcome, detail, time.perf_counter() - start))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Worker:
    def __init__(self, memory_gb: float):
        self.conn, child = mp.Pipe()
        self.proc = mp.get_context("fork").Process(
            target=worker, args=(child, memory_gb), daemon=True
        )
        self.proc.start()
        self.job: tuple | None = None
        self.started = 0.0

    def send(self, job: tuple) -> None:
        self.job, self.started = job, time.monotonic()
        self.conn.send(job)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()


def save_reproducer(out: Path, number: int, seed, ops, pool, why: str) -> Path:
    if seed is None:  # a grammar case: its seed rebuilds it
        directory = out / f"{number:05d}-grammar"
        path = random_case(ops, directory / "case")
        (directory / "ops.txt").write_text(f"grammar\n{ops!r}\n# {why}\n# open: {path}\n")
        return directory
    directory = out / f"{number:05d}-{seed.name}"
    path = materialize_case(seed, ops, pool, directory / "case")
    (directory / "ops.txt").write_text(f"{seed.name}\n{ops!r}\n# {why}\n# open: {path}\n")
    return directory


def replay(directory: Path) -> int:
    from modelscope_tui.readers import open_checkpoint  # noqa: F401  (import errors show here)

    name, ops_text = (directory / "ops.txt").read_text().splitlines()[:2]
    if name == "grammar":
        path = random_case(int(ops_text), Path(tempfile.mkdtemp()) / "case")
        print(f"replaying grammar case {ops_text}\n  {path}")
        print("outcome:", exercise(path))
        return 0
    pool = seeds()
    seed = next(s for s in pool if s.name == name)
    ops = ast.literal_eval(ops_text)
    path = materialize_case(seed, ops, pool, Path(tempfile.mkdtemp()) / "case")
    print(f"replaying {name} {ops!r}\n  {path}")
    print("outcome:", exercise(path))
    return 0


def differential(batch: int, seed: int, minutes: float, out: Path) -> int:
    """Batches of random mutations through the differential harness (one reference-loader
    subprocess per batch). Disagreeing cases are kept under `out` with the judge's line."""
    from hostile.differential import run_random

    deadline = time.monotonic() + minutes * 60
    cases = disagreements = 0
    round_ = 0
    while time.monotonic() < deadline:
        where = out / f"batch-{seed}-{round_}"
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        verdicts = run_random(batch, seed * 1_000_003 + round_, where)
        cases += len(verdicts)
        bad = [v for v in verdicts if not v.agree]
        disagreements += len(bad)
        for v in bad:
            print(f"DISAGREE {v.name}: {v.how[:400]}", flush=True)
        if not bad:
            shutil.rmtree(where, ignore_errors=True)
        round_ += 1
    print(f"differential: {cases:,} cases, {disagreements:,} disagreements")
    return 1 if disagreements else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=20, help="seconds before a case is a hang")
    parser.add_argument(
        "--memory-gb", type=float, default=4, help="address space per worker (0: none)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "_data" / "fuzz")
    parser.add_argument(
        "--grammar", type=float, default=0.5, help="share of cases from the pickle grammar (0..1)"
    )
    parser.add_argument("--replay", type=Path, default=None)
    parser.add_argument(
        "--differential", type=int, default=0, metavar="N",
        help="also run the differential harness (tests/hostile/differential.py) on N random mutations "
        "per batch until --minutes pass: mscope must agree with the reference loader or be stricter",
    )  # fmt: skip
    args = parser.parse_args()
    if args.replay:
        return replay(args.replay)
    if args.differential:
        return differential(args.differential, args.seed, args.minutes, args.out / "differential")

    pool = seeds()
    rng = random.Random(args.seed)
    outcomes: collections.Counter[str] = collections.Counter()
    by_seed: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    bugs: list[tuple[str, str, Path]] = []
    slowest = (0.0, "")
    workers = [Worker(args.memory_gb) for _ in range(args.jobs)]
    start = time.monotonic()
    deadline = start + args.minutes * 60
    last_report = start
    tried = 0

    def record(w: Worker, outcome: str, detail: str, seconds: float) -> None:
        nonlocal slowest
        index, ops = w.job  # type: ignore[misc]
        seed = pool[index] if index != GRAMMAR else None
        name = seed.name if seed is not None else "grammar"
        outcomes[outcome] += 1
        by_seed[name][outcome] += 1
        if seconds > slowest[0]:
            slowest = (seconds, f"{name} {ops!r}"[:300])
        if outcome.startswith(("BUG", "HANG", "CRASH")):
            where = save_reproducer(args.out, len(bugs) + 1, seed, ops, pool, outcome)
            bugs.append((outcome, detail, where))
            print(f"!! {outcome} on {name}: reproducer {where}\n{detail}", flush=True)
        w.job = None

    def dispatch(w: Worker) -> None:
        nonlocal tried
        if rng.random() < args.grammar:
            w.send((GRAMMAR, rng.randrange(1 << 62)))
        else:
            index = rng.randrange(len(pool))
            w.send((index, random_ops(rng, pool[index], pool)))
        tried += 1

    for w in workers:
        dispatch(w)
    while workers:
        now = time.monotonic()
        for w in list(workers):
            if w.job is None:
                continue
            if w.conn.poll(0.01):
                try:
                    outcome, detail, seconds = w.conn.recv()
                except (EOFError, OSError):
                    outcome, detail, seconds = (
                        "CRASH",
                        f"worker exit code {w.proc.exitcode}",
                        now - w.started,
                    )
                    record(w, outcome, detail, seconds)
                    w.kill()
                    workers[workers.index(w)] = w = Worker(args.memory_gb)
                else:
                    record(w, outcome, detail, seconds)
            elif not w.proc.is_alive():
                record(w, "CRASH", f"worker exit code {w.proc.exitcode}", now - w.started)
                w.kill()
                workers[workers.index(w)] = w = Worker(args.memory_gb)
            elif now - w.started > args.timeout:
                record(w, "HANG", f"no answer after {args.timeout} s", now - w.started)
                w.kill()
                workers[workers.index(w)] = w = Worker(args.memory_gb)
            if w.job is None:
                if time.monotonic() < deadline:
                    dispatch(w)
                else:
                    w.conn.send(None)
                    w.proc.join(5)
                    workers.remove(w)
        if time.monotonic() - last_report > 30:
            last_report = time.monotonic()
            done = sum(outcomes.values())
            print(f"{last_report - start:6.0f} s  {done:,} cases  {dict(outcomes)}", flush=True)

    elapsed = time.monotonic() - start
    done = sum(outcomes.values())
    print(
        f"\n{done:,} cases in {elapsed:.0f} s ({done / elapsed:.0f}/s), {args.jobs} workers, seed {args.seed}"
    )
    print("outcomes (MscopeError class, 'opened', 'partial' = some tensors unreadable):")
    for outcome, count in outcomes.most_common():
        print(f"  {count:8,}  {outcome}")
    print("by seed:")
    for name, counts in sorted(by_seed.items()):
        print(
            f"  {name:20} {sum(counts.values()):7,}  "
            + ", ".join(f"{k} {v:,}" for k, v in counts.most_common())
        )
    print(f"slowest case: {slowest[0]:.2f} s  {slowest[1]}")
    print(f"non-MscopeError outcomes: {len(bugs)}")
    for outcome, detail, where in bugs:
        last = detail.strip().splitlines()[-1] if detail.strip() else ""
        print(f"  {outcome}: {last[:200]}  ->  {where}")
    return 1 if bugs else 0


if __name__ == "__main__":
    raise SystemExit(main())
