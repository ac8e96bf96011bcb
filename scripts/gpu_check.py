#!/usr/bin/env python3
"""Check mscope's GPU figures on a machine with an NVIDIA GPU (about 10-30 s).

    python scripts/gpu_check.py

1. NVML through `modelscope_tui.gpu` against `nvidia-smi --query-gpu=...`: GPU count, name,
   UUID, PCI bus id, memory total (to 1 MiB) and memory used (to max(256 MiB, 2 %), since
   other processes may allocate in between).
2. The CUDA index mapping worked out from CUDA_VISIBLE_DEVICES before CUDA starts, against the
   mapping from torch's device UUIDs after it starts.
3. `sample_models/transformer_tied.pt`, read with `open_checkpoint` + `TensorData`, moved onto
   cuda:0: `torch.cuda.memory_allocated()` against the sum of the tensor bytes (each allocation
   rounded up to the caching allocator's 512-byte blocks), the monitor's torch figures, and
   this process in NVML's process list.
4. `mscope gpus` / `mscope gpus --json` exit 0 and agree on the count.

Prints PASS / FAIL / INFO / SKIP lines; exits 1 on any FAIL, 0 with a SKIP line without a GPU.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_models" / "transformer_tied.pt"
MiB = 1 << 20
BLOCK = 512  # CUDA caching allocator: every block is a multiple of 512 bytes

try:
    import modelscope_tui  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))

from modelscope_tui.gpu import NA, GpuMonitor, NvmlBackend  # noqa: E402

failures: list[str] = []


def report(ok: bool | None, what: str) -> None:
    """ok True: PASS, False: FAIL, None: INFO."""
    tag = "INFO" if ok is None else ("PASS" if ok else "FAIL")
    if ok is False:
        failures.append(what)
    print(f"{tag}: {what}", flush=True)


def nvidia_smi() -> list[dict[str, str]] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    for fields in (
        "index,name,uuid,pci.bus_id,memory.total,memory.used,memory.reserved",
        "index,name,uuid,pci.bus_id,memory.total,memory.used",
    ):
        try:
            out = subprocess.run(
                [exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            report(False, f"nvidia-smi did not answer: {exc}")
            return None
        if out.returncode == 0:
            keys = fields.split(",")
            rows = csv.reader(io.StringIO(out.stdout), skipinitialspace=True)
            return [dict(zip(keys, (v.strip() for v in row))) for row in rows if row]
    report(False, f"nvidia-smi --query-gpu failed: {out.stderr.strip() or out.stdout.strip()}")
    return None


def smi_int(value: str) -> int | None:
    try:
        return int(float(value))
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def check_against_smi(mon: GpuMonitor) -> None:
    rows = nvidia_smi()
    s = mon.sample()  # right after nvidia-smi, so memory.used moved as little as possible
    if rows is None:
        report(None, "nvidia-smi not found: NVML-vs-nvidia-smi checks skipped")
        return
    report(len(rows) == len(s.gpus), f"GPU count: NVML {len(s.gpus)}, nvidia-smi {len(rows)}")
    for row in rows:
        idx = smi_int(row["index"])
        g = s.gpu(idx) if idx is not None else None
        if g is None:
            report(False, f"nvidia-smi GPU {row['index']} missing from NVML")
            continue
        tag = f"GPU {g.nvml_index}"
        report(g.name == row["name"], f"{tag} name: NVML {g.name!r}, nvidia-smi {row['name']!r}")
        report(g.uuid == row["uuid"], f"{tag} uuid: NVML {g.uuid}, nvidia-smi {row['uuid']}")
        report(
            str(g.pci_bus_id).upper() == row["pci.bus_id"].upper(),
            f"{tag} PCI bus id: NVML {g.pci_bus_id}, nvidia-smi {row['pci.bus_id']}",
        )
        total = smi_int(row["memory.total"])
        if g.memory_total is NA or total is None:
            report(False, f"{tag} memory total missing: NVML {g.memory_total}, nvidia-smi {total}")
        else:
            nv = g.memory_total // MiB
            report(
                abs(nv - total) <= 1, f"{tag} memory total: NVML {nv} MiB, nvidia-smi {total} MiB"
            )
        used = smi_int(row["memory.used"])
        if g.memory_used is NA or used is None:
            report(False, f"{tag} memory used missing: NVML {g.memory_used}, nvidia-smi {used}")
        else:
            tol = max(256, int(0.02 * (g.memory_total or 0) / MiB))
            candidates = [g.memory_used // MiB]
            if g.memory_reserved is not NA:  # older nvidia-smi counts reserved as used
                candidates.append((g.memory_used + g.memory_reserved) // MiB)
            diff = min(abs(c - used) for c in candidates)
            report(
                diff <= tol,
                f"{tag} memory used: NVML {candidates[0]} MiB (reserved {g.memory_reserved if g.memory_reserved is NA else g.memory_reserved // MiB} MiB),"
                f" nvidia-smi {used} MiB (tolerance {tol} MiB)",
            )
        if "memory.reserved" in row and g.memory_reserved is not NA:
            res = smi_int(row["memory.reserved"])
            if res is not None:
                report(
                    abs(g.memory_reserved // MiB - res) <= 1,
                    f"{tag} memory reserved: NVML {g.memory_reserved // MiB} MiB, nvidia-smi {res} MiB",
                )
        report(
            None,
            f"{tag} util {g.util_gpu}%/{g.util_memory}%, {g.temperature} C, power {g.power_draw}/"
            f"{g.power_limit} W, MIG {g.mig_mode}, {len(g.processes)} process(es)",
        )


def check_torch(mon: GpuMonitor) -> None:
    before = mon.sample().cuda_mapping
    report(
        None,
        f"mapping before CUDA init: {before.source}, exact={before.exact} {before.note}".rstrip(),
    )
    before_idx = {g.nvml_index: g.cuda_index for g in mon.latest.gpus}
    t0 = time.monotonic()
    import torch

    if not torch.cuda.is_available():
        print(
            f"SKIP: torch {torch.__version__} sees no CUDA device; model checks skipped", flush=True
        )
        return
    torch.cuda.init()
    report(None, f"torch {torch.__version__} import + CUDA init {time.monotonic() - t0:.1f} s")
    after_sample = mon.sample()
    after = after_sample.cuda_mapping
    after_idx = {g.nvml_index: g.cuda_index for g in after_sample.gpus}
    report(
        after.source == "torch" and after.exact,
        f"mapping after CUDA init: {after.source}, exact={after.exact} {after.note}".rstrip(),
    )
    visible = len(after.gpu) + len(after.mig)
    report(
        visible == torch.cuda.device_count(),
        f"mapped devices {visible}, torch.cuda.device_count() {torch.cuda.device_count()}",
    )
    same = before_idx == after_idx
    if before.exact:
        report(same, f"CUDA_VISIBLE_DEVICES mapping {before_idx} equals torch's {after_idx}")
    else:
        report(None, f"approximate mapping {before_idx}; torch's {after_idx} (match: {same})")

    from modelscope_tui import open_checkpoint
    from modelscope_tui.tensordata import TensorData

    dev = torch.device("cuda:0")
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    ckpt = open_checkpoint(SAMPLE)
    records = ckpt.model_tensors
    moved = []
    with TensorData() as data:
        for rec in records:
            moved.append(data.tensor(rec).to(dev))
    torch.cuda.synchronize(dev)
    allocated = torch.cuda.memory_allocated(dev) - base
    record_bytes = sum(r.nbytes for r in records)
    raw = sum(t.untyped_storage().nbytes() for t in moved)
    rounded = sum(
        -(-n // BLOCK) * BLOCK for n in (t.untyped_storage().nbytes() for t in moved) if n
    )
    report(
        raw == record_bytes,
        f"{len(records)} tensors: checkpoint says {record_bytes:,} B, moved storages {raw:,} B",
    )
    report(
        raw <= allocated <= rounded,
        f"torch.cuda.memory_allocated() grew by {allocated:,} B; tensor bytes {raw:,} B,"
        f" rounded to {BLOCK}-byte blocks {rounded:,} B",
    )

    s = mon.sample()
    g = s.by_cuda_index(0)
    if g is None:
        report(False, "no NVML GPU is mapped to cuda:0")
    else:
        tm = g.torch_memory
        report(
            tm is not None and tm.allocated == torch.cuda.memory_allocated(dev),
            f"monitor's torch figure for cuda:0 ({g.label}): {tm.allocated if tm else 'none'} B allocated,"
            f" torch says {torch.cuda.memory_allocated(dev):,} B",
        )
        me = g.self_process
        reserved = torch.cuda.memory_reserved(dev)
        if me is None:
            pids = [p.pid for p in g.processes]
            report(None, f"this process ({os.getpid()}) not in NVML's list {pids} (PID namespace?)")
        elif me.used_memory is NA:
            report(None, "this process is listed, GPU memory n/a")
        else:
            report(
                me.used_memory >= reserved,
                f"NVML: this process uses {me.used_memory:,} B on the GPU >= torch reserved {reserved:,} B",
            )
        report(
            g.memory_used is not NA and g.memory_used >= reserved,
            f"NVML memory used {g.memory_used} B >= torch reserved {reserved:,} B",
        )
    del moved
    torch.cuda.synchronize(dev)
    report(
        torch.cuda.memory_allocated(dev) == base, "memory_allocated back to its start after release"
    )


def check_thread(mon: GpuMonitor) -> None:
    ticks: list = []
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        mon.sample()
        times.append(time.perf_counter() - t0)
    report(
        None,
        f"NVML tick: median {statistics.median(times) * 1e3:.2f} ms for {len(mon.latest.gpus)} GPU(s)",
    )
    mon.start(interval=0.1, on_sample=ticks.append)
    time.sleep(1.0)
    mon.stop()
    report(
        len(ticks) >= 5 and not mon.running and mon.callback_errors == 0,
        f"monitor thread: {len(ticks)} ticks in 1 s, stopped cleanly",
    )


def check_cli() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSCOPE_SIMULATE")}
    cmd = [sys.executable, "-m", "modelscope_tui", "gpus"]
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    report(
        text.returncode == 0 and "Traceback" not in text.stderr,
        f"`mscope gpus` exit {text.returncode}: {text.stdout.splitlines()[:1]}",
    )
    js = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=60, env=env)
    try:
        doc = json.loads(js.stdout)
        report(
            js.returncode == 0 and doc["state"] == "ok",
            f"`mscope gpus --json`: state {doc['state']}, {len(doc['gpus'])} GPU(s)",
        )
    except (ValueError, KeyError) as exc:
        report(
            False,
            f"`mscope gpus --json` output unreadable: {exc}: {js.stdout[:200]!r} {js.stderr[:200]!r}",
        )


def main() -> int:
    started = time.monotonic()
    mon = GpuMonitor(NvmlBackend())
    s = mon.sample()
    if s.state in ("no-nvml", "no-driver", "no-gpus"):
        print(f"SKIP: {s.status}; {s.host.line()}")
        return 0
    if not s.ok:
        report(False, f"NVML: {s.status}")
        return 1
    report(True, f"NVML: {s.status}")
    checks = (check_against_smi, check_thread, check_torch)
    for check in checks:
        try:
            check(mon)
        except Exception as exc:  # one broken check must not hide the others
            report(False, f"{check.__name__} raised {type(exc).__name__}: {exc}")
    try:
        check_cli()
    except Exception as exc:
        report(False, f"check_cli raised {type(exc).__name__}: {exc}")
    mon.close()
    print(
        f"{'FAIL' if failures else 'PASS'}: {len(failures)} failure(s) in {time.monotonic() - started:.1f} s"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
