#!/usr/bin/env python
"""Benchmark ``mscope summary --json`` against a plain ``torch.load(mmap=True)``.

    python bench/bench_summary.py [--only NAME ...] [--workdir DIR] [--repeat N]

Large inputs are generated on first use into ``--workdir`` (default
``bench/_data/``, gitignored) and reused afterwards:

  gpt_1p3b_fp16.pt            ~1.3B-param GPT-style fp16 state_dict (~2.6 GB)
  gpt_1p3b_fp16.safetensors   the same tensors as safetensors
  gpt2_medium_full.pt         torch.save(model) of a GPT-2 medium (355M, fp32)
  state_dict_100k.pt          100,000 tiny tensors
  llama2_7b_nf4/model.safetensors   Llama-2-7B names and shapes in bitsandbytes' nf4 layout
                              (double quant), packed weights as a sparse file (~3.8 GB)

The torch side is ``torch.load(mmap=True)``, or ``safetensors.torch.load_file`` for a
safetensors file (torch.load cannot read one).

Every measurement is a whole child process (interpreter start and imports
included): wall time around Popen..wait4, and the child's own peak RSS from
``os.wait4`` (``ru_maxrss``, KiB on Linux). Each command runs ``--repeat``
times; the table shows the median time and the max RSS.

Measurement caveat: on Linux a child's ru_maxrss starts at its *parent's* peak
RSS (exec records the old mm's high-water mark, and subprocess uses vfork), so
this driver deliberately never imports torch nor generates data in-process.
The floor it imposes is printed ("RSS floor") and is the RSS of an exec'd
``/bin/true``.

After the measured runs, one extra unmeasured mscope run per file checks that
its stdout parses as JSON (``--no-validate`` skips it), so a fast exit 0 that
printed nothing useful cannot PASS.

This is a benchmark, not a test: it always exits 0 unless arguments are bad.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
MAKE_DATA = BENCH_DIR / "_make_bench_data.py"


@dataclass(frozen=True)
class Case:
    name: str
    time_ratio_target: float | None = None  # mscope time / torch time must be <= this
    rss_target_mb: float | None = None  # mscope peak RSS must be < this
    full_module: bool = False  # torch side needs weights_only=False + importable class


CASES = [
    Case("gpt_1p3b_fp16.pt", time_ratio_target=0.1, rss_target_mb=60),
    Case("gpt_1p3b_fp16.safetensors", time_ratio_target=0.1, rss_target_mb=60),
    Case("gpt2_medium_full.pt", full_module=True),
    Case("state_dict_100k.pt", time_ratio_target=0.15),
    # issue #16: "the summary of a 4-bit 7B-layout file stays under 0.05x torch's load time"
    Case("llama2_7b_nf4/model.safetensors", time_ratio_target=0.05),
]


@dataclass
class Run:
    seconds: float
    maxrss_kib: int
    returncode: int
    stderr: str = ""


@dataclass
class Result:
    runs: list[Run] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.returncode == 0 for r in self.runs)

    @property
    def median_s(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def max_rss_mb(self) -> float:
        return max(r.maxrss_kib for r in self.runs) / 1024

    @property
    def first_error(self) -> str:
        for r in self.runs:
            if r.returncode != 0:
                return f"exit {r.returncode}\n{r.stderr}"
        return ""


def measure(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Run cmd to completion; stdout to /dev/null, stderr kept (via a file, no pipe deadlock)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env
            )
        except OSError as e:
            return Run(time.perf_counter() - t0, 0, 127, f"{type(e).__name__}: {e}")
        _, status, rusage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped; keep Popen quiet
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    return Run(elapsed, rusage.ru_maxrss, proc.returncode, stderr)


def stdout_is_json(cmd: list[str]) -> str:
    """Run cmd once more (unmeasured), keeping stdout; return "" if it parses as JSON.

    Parsing happens in a child so the driver's own peak RSS stays small.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        rc = subprocess.call(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        if rc != 0:
            err.seek(0)
            return f"exit {rc} on validation run\n{err.read().decode('utf-8', 'replace')}"
        out.seek(0)
        check = subprocess.run(
            [sys.executable, "-c", "import json, sys; json.load(sys.stdin)"],
            stdin=out,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        return f"stdout of `summary --json` is not valid JSON: {last}"
    return ""


def mscope_cmd() -> list[str]:
    script = Path(sys.executable).parent / "mscope"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "modelscope_tui"]


def torch_cmd(path: Path, case: Case) -> tuple[list[str], dict[str, str]]:
    weights_only = not case.full_module
    code = f"import torch; torch.load({str(path)!r}, mmap=True, weights_only={weights_only})"
    if path.suffix == ".safetensors":  # torch.load cannot read it: its own torch loader does
        code = f"from safetensors.torch import load_file; load_file({str(path)!r})"
    env = dict(os.environ)
    if case.full_module:
        # The pickle references _gpt_model.GPT2LMHeadModel; torch must import it.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")]))
    return [sys.executable, "-c", code], env


def ensure_data(case: Case, workdir: Path) -> Path:
    path = workdir / case.name
    if path.exists():
        return path
    print(f"generating {path} ...", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(MAKE_DATA), case.name, str(path)], check=True)
    print(
        f"  done in {time.perf_counter() - t0:.1f}s, {human_size(path.stat().st_size)}", flush=True
    )
    return path


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def verdict(case: Case, ms: Result, tr: Result) -> tuple[str, str, str]:
    """Return (ratio, target, PASS/FAIL/-)."""
    ratio = ms.median_s / tr.median_s if ms.ok and tr.ok and tr.median_s > 0 else None
    ratio_s = f"{ratio:.3f}x" if ratio is not None else "-"
    parts = []
    if case.time_ratio_target is not None:
        parts.append(f"<= {case.time_ratio_target}x")
    if case.rss_target_mb is not None:
        parts.append(f"< {case.rss_target_mb:g} MB")
    target = ", ".join(parts) or "-"
    if not ms.ok:
        return ratio_s, target, "FAIL"
    if not parts:
        return ratio_s, target, "-"
    rss_ok = case.rss_target_mb is None or ms.max_rss_mb < case.rss_target_mb
    if case.time_ratio_target is not None and ratio is None:
        # torch skipped or failed: only the RSS part can be judged.
        if not rss_ok:
            return ratio_s, target, "FAIL"
        return ratio_s, target, "PASS (RSS only)" if case.rss_target_mb is not None else "-"
    time_ok = case.time_ratio_target is None or (
        ratio is not None and ratio <= case.time_ratio_target
    )
    return ratio_s, target, "PASS" if rss_ok and time_ok else "FAIL"


def select(only: list[str] | None) -> list[Case]:
    if not only:
        return CASES
    wanted = [w for item in only for w in item.split(",") if w]
    chosen = []
    for w in wanted:
        hits = [c for c in CASES if c.name == w or Path(c.name).stem == w or w in c.name]
        if not hits:
            sys.exit(
                f"--only {w!r} matches nothing; choose from: {', '.join(c.name for c in CASES)}"
            )
        chosen += [c for c in hits if c not in chosen]
    return [c for c in CASES if c in chosen]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="file name, stem or substring (repeatable or comma-separated)",
    )
    ap.add_argument("--workdir", type=Path, default=BENCH_DIR / "_data")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--generate-only", action="store_true", help="make missing data files and stop")
    ap.add_argument("--skip-torch", action="store_true", help="only time mscope (ratio shows '-')")
    ap.add_argument(
        "--no-validate",
        dest="validate",
        action="store_false",
        help="don't do the extra unmeasured run that checks mscope's stdout is JSON",
    )
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")

    cases = select(args.only)
    workdir = args.workdir.resolve()
    paths = {c.name: ensure_data(c, workdir) for c in cases}
    if args.generate_only:
        return 0

    mscope = mscope_cmd()
    floor = measure(["/bin/true"]) if shutil.which("true") or Path("/bin/true").exists() else None
    print(f"\nmscope command: {' '.join(mscope)} summary --json FILE")
    print('torch command:  python -c "import torch; torch.load(F, mmap=True, weights_only=True)"')
    if floor is not None:
        print(
            f"RSS floor (exec'd /bin/true inherits the driver's peak): {floor.maxrss_kib / 1024:.1f} MB"
        )
    print(f"repeat: {args.repeat} (median time, max RSS)\n", flush=True)

    # Our shells set PYTHONDONTWRITEBYTECODE: every module edited since its .pyc was written would
    # be recompiled in every measured run. Drop it and write the bytecode once, unmeasured.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(BENCH_DIR.parent / "src")], stdout=subprocess.DEVNULL, check=False)

    rows = []
    errors = []
    for case in cases:
        path = paths[case.name]
        ms, tr = Result(), Result()
        tcmd, tenv = torch_cmd(path, case)
        for i in range(args.repeat):
            ms.runs.append(measure([*mscope, "summary", "--json", str(path)]))
            if not args.skip_torch:
                tr.runs.append(measure(tcmd, tenv))
            print(
                f"  {case.name} #{i + 1}: mscope {fmt_run(ms.runs[-1])}"
                + ("" if args.skip_torch else f"   torch {fmt_run(tr.runs[-1])}"),
                flush=True,
            )
        if ms.ok and args.validate:
            problem = stdout_is_json([*mscope, "summary", "--json", str(path)])
            if problem:
                ms.runs.append(Run(0.0, 0, 1, problem))  # marks the row FAIL
        if not ms.ok:
            errors.append((case.name, "mscope", ms.first_error))
        if tr.runs and not tr.ok:
            errors.append((case.name, "torch", tr.first_error))
        ratio, target, result = verdict(case, ms, tr)
        name = case.name + (" *" if case.full_module else "")
        rows.append(
            [
                name,
                human_size(path.stat().st_size),
                f"{ms.median_s:.3f} s" if ms.ok else "error",
                f"{ms.max_rss_mb:.1f}" if ms.ok else "-",
                f"{tr.median_s:.3f} s" if tr.ok else ("error" if tr.runs else "-"),
                f"{tr.max_rss_mb:.1f}" if tr.ok else "-",
                ratio,
                target,
                result,
            ]
        )

    for name, who, err in errors:
        print(f"\n--- {who} failed on {name}: {err.rstrip()[-4000:]}", file=sys.stderr)

    header = [
        "file",
        "size",
        "mscope time",
        "mscope peak RSS MB",
        "torch time",
        "torch peak RSS MB",
        "ratio (mscope/torch)",
        "target",
        "result",
    ]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if any(c.full_module for c in cases):
        print(
            "\n\\* full-module pickle: torch side uses weights_only=False (it has to import "
            "_gpt_model.GPT2LMHeadModel from bench/); mscope must not import or run it."
        )
    return 0


def fmt_run(r: Run) -> str:
    if r.returncode != 0:
        return f"exit {r.returncode} ({r.seconds:.2f}s)"
    return f"{r.seconds:.3f}s {r.maxrss_kib / 1024:.1f}MB"


if __name__ == "__main__":
    sys.exit(main())
