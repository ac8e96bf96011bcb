#!/usr/bin/env python3
"""Check mscope's GPU half on a machine with an NVIDIA GPU (about 2-4 minutes with --full).

    python scripts/gpu_check.py [--full] [--out DIR] [--panel-seconds 30]

Always (10-30 s):
1. NVML through `modelscope_tui.gpu` (nvml.py) against `nvidia-smi --query-gpu=...`: count, name, UUID,
   PCI bus id, memory total/used/reserved, utilisation, temperature, power draw, MIG mode.
2. The CUDA index mapping worked out before CUDA starts against torch's own, in this process
   and in child processes under several CUDA_VISIBLE_DEVICES spellings (a permutation, full and
   short UUIDs, repeats, invalid entries, empty).
3. `sample_models/transformer_tied.pt` moved onto cuda:0 (allocator figures, this process in
   NVML's list, the CUDA context's own size), the monitor thread, `mscope gpus [--json]`.

With --full (a GPT-2-medium-sized state_dict, 355M parameters, generated in a temp dir):
4. `Placement.move` (the explorer's `m`) onto cuda:0: bytes moved against
   `torch.cuda.memory_allocated`, time against `torch.load(map_location='cuda:0')`, values
   bit-exact against a CPU `torch.load`.
5. Out-of-memory rollback: the GPU filled until less than the model fits, then the move;
   `memory_allocated` back to its baseline and NVML back to within the CUDA context's size,
   while the error is still held; the message says needed vs free.
6. The fine-tune estimate against a real training step for every precision x optimizer (full
   and the last half of the blocks trainable): memory after the step and the step's peak
   against `estimate_for_session` (batch 1, 8 tokens, so activations are small).
7. The explorer headless (Pilot) with the GPU panel on: the real `m` onto cuda:0, then idle
   for --panel-seconds: NVML tick time and the process's CPU use; then a second process
   allocating 4 GiB must show in the panel within one refresh.

Prints PASS / FAIL / INFO / SKIP lines; --out DIR also gets gpu_check.json (every figure).
Exits 1 on any FAIL, 0 with a SKIP line without a GPU.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_models" / "transformer_tied.pt"
MiB = 1 << 20
GiB = 1 << 30
BLOCK = 512  # CUDA caching allocator: every block is a multiple of 512 bytes

try:
    import modelscope_tui  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))

from modelscope_tui.gpu.monitor import GpuMonitor  # noqa: E402
from modelscope_tui.gpu.na import NA  # noqa: E402
from modelscope_tui.gpu.nvml import NvmlBackend  # noqa: E402

failures: list[str] = []
results: dict = {"checks": []}  # everything measured, for --out


def report(ok: bool | None, what: str) -> None:
    """ok True: PASS, False: FAIL, None: INFO."""
    tag = "INFO" if ok is None else ("PASS" if ok else "FAIL")
    if ok is False:
        failures.append(what)
    results["checks"].append([tag, what])
    print(f"{tag}: {what}", flush=True)


SMI_FIELDS = (
    "index,name,uuid,pci.bus_id,memory.total,memory.used,memory.reserved,utilization.gpu,"
    "temperature.gpu,power.draw,mig.mode.current"
)


def nvidia_smi() -> list[dict[str, str]] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    for fields in (
        SMI_FIELDS,
        "index,name,uuid,pci.bus_id,memory.total,memory.used,utilization.gpu,temperature.gpu,power.draw",
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


def smi_num(value: str | None) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # "[N/A]", "[Not Supported]"
        return None


def smi_int(value: str | None) -> int | None:
    v = smi_num(value)
    return None if v is None else int(v)


def check_against_smi(mon: GpuMonitor) -> None:
    rows = nvidia_smi()
    s = mon.sample()  # right after nvidia-smi, so memory.used moved as little as possible
    if rows is None:
        report(None, "nvidia-smi not found: NVML-vs-nvidia-smi checks skipped")
        return
    results["nvidia_smi"] = rows
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
            res = "n/a" if g.memory_reserved is NA else f"{g.memory_reserved // MiB} MiB"
            report(
                diff <= tol,
                f"{tag} memory used: NVML {candidates[0]} MiB (reserved {res}),"
                f" nvidia-smi {used} MiB (tolerance {tol} MiB)",
            )
        if "memory.reserved" in row and g.memory_reserved is not NA:
            res = smi_int(row["memory.reserved"])
            if res is not None:
                report(
                    abs(g.memory_reserved // MiB - res) <= 1,
                    f"{tag} memory reserved: NVML {g.memory_reserved // MiB} MiB, nvidia-smi {res} MiB",
                )
        # Live figures move between the two reads: generous tolerances, both must be present.
        temp = smi_num(row.get("temperature.gpu"))
        if temp is not None:
            report(
                g.temperature is not NA and abs(g.temperature - temp) <= 3,
                f"{tag} temperature: NVML {g.temperature} C, nvidia-smi {temp:g} C",
            )
        power = smi_num(row.get("power.draw"))
        if power is not None:
            report(
                g.power_draw is not NA and abs(g.power_draw - power) <= max(30.0, 0.25 * power),
                f"{tag} power draw: NVML {g.power_draw} W, nvidia-smi {power:g} W",
            )
        util = smi_num(row.get("utilization.gpu"))
        if util is not None:
            report(
                g.util_gpu is not NA,
                f"{tag} utilisation: NVML {g.util_gpu}%, nvidia-smi {util:g}% (live; not compared)",
            )
        mig = row.get("mig.mode.current")
        if mig is not None:
            smi_mig = {"enabled": True, "disabled": False}.get(mig.strip().lower())
            if smi_mig is None:  # "[N/A]": the GPU has no MIG; NVML must not claim it does
                report(g.mig_mode is not True, f"{tag} MIG: nvidia-smi {mig!r}, NVML {g.mig_mode}")
            else:
                report(
                    g.mig_mode == smi_mig and (smi_mig or not g.mig_devices),
                    f"{tag} MIG mode: NVML {g.mig_mode} ({len(g.mig_devices)} MIG device(s)),"
                    f" nvidia-smi {mig}",
                )
        report(
            None,
            f"{tag} util {g.util_gpu}%/{g.util_memory}%, {g.temperature} C, power {g.power_draw}/"
            f"{g.power_limit} W, MIG {g.mig_mode}, {len(g.processes)} process(es)",
        )


# -- CUDA_VISIBLE_DEVICES: predicted mapping (before CUDA starts) against torch's -----------------
def mapping_child() -> int:
    """Run under a CUDA_VISIBLE_DEVICES spelling: print our mapping before CUDA starts, and the
    truth after (torch's device UUIDs matched to NVML's directly, not through our code)."""
    backend = NvmlBackend()
    s = backend.sample()
    before = s.cuda_mapping
    import torch

    count = torch.cuda.device_count()
    truth: dict[str, int] = {}
    if count:
        torch.cuda.init()
        by_uuid = {str(g.uuid).lower().removeprefix("gpu-"): g.nvml_index for g in s.gpus}
        for i in range(count):
            u = str(torch.cuda.get_device_properties(i).uuid).lower().removeprefix("gpu-")
            truth[str(by_uuid.get(u, -1))] = i
    after = backend.sample().cuda_mapping
    doc = {
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "before": {str(k): v for k, v in before.gpu.items()},
        "before_source": before.source,
        "before_exact": before.exact,
        "before_note": before.note,
        "after": {str(k): v for k, v in after.gpu.items()},
        "after_source": after.source,
        "truth": truth,
        "count": count,
    }
    print(json.dumps(doc))
    backend.close()
    return 0


def visible_spellings(uuids: list[str]) -> list[str | None]:
    n = len(uuids)
    out: list[str | None] = [None, "", ",".join(str(i) for i in reversed(range(n)))]
    out += [uuids[-1], uuids[-1][:12], uuids[0] + ",0", "0,0", f"{n}", f"0,{n}", "-1", "0junk"]
    if n > 1:
        out += [f"{n - 1},0", ",".join(reversed(uuids)), f"{uuids[1]},{uuids[0][:12]}"]
    return list(dict.fromkeys(out))


def check_visible_devices(mon: GpuMonitor) -> None:
    uuids = [str(g.uuid) for g in mon.latest.gpus if g.uuid is not NA]
    if not uuids:
        report(False, "no GPU UUIDs from NVML: CUDA_VISIBLE_DEVICES checks skipped")
        return
    procs = []
    for spelling in visible_spellings(uuids):
        env = dict(os.environ)
        env.pop("CUDA_VISIBLE_DEVICES", None)
        if spelling is not None:
            env["CUDA_VISIBLE_DEVICES"] = spelling
        cmd = [sys.executable, str(Path(__file__).resolve()), "--mapping-child"]
        procs.append(
            (
                spelling,
                subprocess.Popen(
                    cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                ),
            )
        )
    rows = []
    for spelling, proc in procs:
        out, err = proc.communicate(timeout=120)
        try:
            doc = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            report(False, f"CUDA_VISIBLE_DEVICES={spelling!r}: child failed: {err.strip()[-300:]}")
            continue
        rows.append(doc)
        shown = "unset" if spelling is None else repr(spelling)
        report(
            doc["before"] == doc["truth"] and doc["after"] == doc["truth"],
            f"CUDA_VISIBLE_DEVICES={shown}: predicted {doc['before']} ({doc['before_source']},"
            f" exact={doc['before_exact']}), after CUDA init {doc['after']}, torch {doc['truth']}"
            f" ({doc['count']} device(s)){'; ' + doc['before_note'] if doc['before_note'] else ''}",
        )
    results["visible_devices"] = rows


# -- this process: allocator, NVML's process list, the CUDA context --------------------------------
def check_torch(mon: GpuMonitor) -> bool:
    before = mon.sample().cuda_mapping
    report(
        None,
        f"mapping before CUDA init: {before.source}, exact={before.exact} {before.note}".rstrip(),
    )
    before_idx = {g.nvml_index: g.cuda_index for g in mon.latest.gpus}
    used_before_cuda = {g.nvml_index: g.memory_used for g in mon.latest.gpus}
    t0 = time.monotonic()
    import torch

    if not torch.cuda.is_available():
        print(
            f"SKIP: torch {torch.__version__} sees no CUDA device; model checks skipped", flush=True
        )
        return False
    torch.cuda.init()
    torch.zeros(1, device="cuda:0")  # the context exists once something ran
    torch.cuda.synchronize()
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

    g0 = after_sample.by_cuda_index(0)
    if (
        g0 is not None
        and g0.memory_used is not NA
        and used_before_cuda.get(g0.nvml_index) is not NA
    ):
        ctx = g0.memory_used - used_before_cuda[g0.nvml_index] - torch.cuda.memory_reserved(0)
        results["cuda_context_bytes"] = ctx
        report(
            None,
            f"CUDA context of this process: about {ctx / MiB:.0f} MiB on {g0.label} (NVML used grew by that beyond torch's reserved)",
        )
        me = g0.self_process
        if me is None:
            pids = [p.pid for p in g0.processes]
            report(
                None,
                f"this process ({os.getpid()}) not in NVML's list {pids} (PID namespace or VM?)",
            )

    from modelscope_tui import open_checkpoint
    from modelscope_tui.values.data import TensorData

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
            report(
                None,
                "this process is not in NVML's process list: the panel cannot mark its share from NVML; it uses torch's reserved bytes",
            )
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
    return True


def check_thread(mon: GpuMonitor) -> None:
    ticks: list = []
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        mon.sample()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times) * 1e3
    results["tick_ms_direct"] = sorted(t * 1e3 for t in times)
    report(
        med < 5.0,
        f"NVML tick: median {med:.2f} ms, max {max(times) * 1e3:.2f} ms for {len(mon.latest.gpus)} GPU(s) (target < 5 ms)",
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


# -- a GPT-2-medium-sized model --------------------------------------------------------------------
TRAIN_DEVICE = "cuda"  # a CPU dry run of the script's logic sets "cpu"
GPT = dict(vocab=50257, n_ctx=1024, d=1024, layers=24, heads=16)  # 354.8M parameters, tied head


def gpt_model(**over):
    """GPT-2 medium's parameter layout; attention masks come from SDPA (no mask buffers), so the
    model's memory is exactly the checkpoint's tensors."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    cfg = {**GPT, **over}
    d, heads = cfg["d"], cfg["heads"]

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(d, 3 * d)
            self.c_proj = nn.Linear(d, d)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = (
                z.view(b, t, heads, c // heads).transpose(1, 2) for z in self.c_attn(x).split(c, 2)
            )
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).reshape(b, t, c))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(d)
            self.attn = Attn()
            self.ln_2 = nn.LayerNorm(d)
            self.mlp = nn.Sequential()
            self.mlp.add_module("c_fc", nn.Linear(d, 4 * d))
            self.mlp.add_module("act", nn.GELU(approximate="tanh"))
            self.mlp.add_module("c_proj", nn.Linear(4 * d, d))

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(cfg["vocab"], d)
            self.wpe = nn.Embedding(cfg["n_ctx"], d)
            self.h = nn.ModuleList(Block() for _ in range(cfg["layers"]))
            self.ln_f = nn.LayerNorm(d)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = Body()
            self.lm_head = nn.Linear(d, cfg["vocab"], bias=False)
            self.lm_head.weight = self.transformer.wte.weight

        def forward(self, idx):
            tr = self.transformer
            x = tr.wte(idx) + tr.wpe(torch.arange(idx.size(1), device=idx.device))
            for block in tr.h:
                x = block(x)
            return self.lm_head(tr.ln_f(x))

    return LM()


def make_gpt_file(tmp: Path) -> Path:
    import torch

    torch.manual_seed(0)
    t0 = time.monotonic()
    model = gpt_model()
    path = tmp / "gpt2_medium_sd.pt"
    torch.save(model.state_dict(), path)
    n = sum(p.numel() for p in model.parameters())
    report(
        None,
        f"sample: {path.name}, {n:,} parameters, {path.stat().st_size / GiB:.2f} GiB, made in {time.monotonic() - t0:.1f} s",
    )
    return path


def check_move(path: Path) -> None:
    """The explorer's `m` path (Placement.move) against torch.load(map_location='cuda:0')."""
    import torch

    from modelscope_tui import open_checkpoint
    from modelscope_tui.training.placement import Placement

    dev = torch.device("cuda:0")
    ckpt = open_checkpoint(path)
    names = [t.name for t in ckpt.model_tensors]
    times = {"mscope": [], "torch": []}
    moved_bytes = allocated = 0
    placement = None
    for rep in range(2):
        for who in ("torch", "mscope") if rep % 2 == 0 else ("mscope", "torch"):
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated(dev)
            t0 = time.perf_counter()
            if who == "torch":
                sd = torch.load(path, map_location="cuda:0", weights_only=True)
                torch.cuda.synchronize()
                times[who].append(time.perf_counter() - t0)
                del sd
            else:
                placement = Placement(ckpt)
                result = placement.move(names, "cuda:0")
                torch.cuda.synchronize()
                times[who].append(time.perf_counter() - t0)
                moved_bytes = result.bytes
                allocated = torch.cuda.memory_allocated(dev) - base
                if rep == 0:
                    placement.release()
                    placement = None
    report(
        moved_bytes <= allocated <= moved_bytes + BLOCK * len(names),
        f"move to cuda:0: {moved_bytes:,} B moved (tied storages once), memory_allocated grew by {allocated:,} B",
    )
    mine, theirs = min(times["mscope"]), min(times["torch"])
    results["move_seconds"] = times
    report(
        mine <= 1.5 * theirs,
        f"move time: mscope {mine:.2f} s, torch.load(map_location='cuda:0') {theirs:.2f} s ({mine / theirs:.2f}x; runs {times})",
    )
    cpu = torch.load(path, map_location="cpu", weights_only=True)
    bad = []
    for name in names:
        a = placement.tensors[name].cpu()
        b = cpu[name]
        if (
            a.shape != b.shape
            or a.dtype != b.dtype
            or not torch.equal(
                a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b
            )
        ):
            bad.append(name)
    tied = (
        placement.tensors["lm_head.weight"].data_ptr()
        == placement.tensors["transformer.wte.weight"].data_ptr()
    )
    report(
        not bad and tied,
        f"values bit-exact against a CPU torch.load for {len(names) - len(bad)}/{len(names)} tensors; lm_head tied to wte on the GPU: {tied}",
    )
    placement.release()
    del placement, cpu
    gc.collect()
    torch.cuda.empty_cache()


def nvml_used(mon: GpuMonitor) -> int:
    import torch

    torch.cuda.synchronize()
    g = mon.sample().by_cuda_index(0)
    return int(g.memory_used) if g is not None and g.memory_used is not NA else -1


def check_oom(path: Path, mon: GpuMonitor) -> None:
    import torch

    from modelscope_tui import open_checkpoint
    from modelscope_tui.training.placement import Placement, PlacementError

    dev = torch.device("cuda:0")
    ckpt = open_checkpoint(path)
    names = [t.name for t in ckpt.model_tensors]
    gc.collect()
    torch.cuda.empty_cache()
    base_alloc = torch.cuda.memory_allocated(dev)
    base_nvml = nvml_used(mon)
    placement = Placement(ckpt)
    need = sum({id(t.storage): t.storage.nbytes for t in ckpt.model_tensors}.values())
    free, _ = torch.cuda.mem_get_info(dev)
    hog_bytes = free - need // 2  # leaves about half the model free
    hog = torch.empty(hog_bytes, dtype=torch.uint8, device=dev)
    free_now = torch.cuda.mem_get_info(dev)[0]
    hog_alloc = torch.cuda.memory_allocated(dev)
    report(
        None,
        f"filled cuda:0 with {hog_bytes / GiB:.1f} GiB: {free_now / MiB:.0f} MiB free for a {need / MiB:.0f} MiB model",
    )
    err = None
    t0 = time.perf_counter()
    try:
        placement.move(names, "cuda:0")
    except PlacementError as exc:
        err = exc  # kept, as the explorer keeps the error it shows
    took = time.perf_counter() - t0
    torch.cuda.synchronize()
    line = err.line() if err is not None else "(no error)"
    report(
        err is not None and "needed" in line and "free" in line,
        f"OOM move failed in {took:.2f} s with: {line}",
    )
    left = torch.cuda.memory_allocated(dev) - hog_alloc
    report(
        left == 0 and not placement.device and not placement.tensors,
        f"after the rollback, error still held: memory_allocated {left:+,} B against the filled baseline; placement empty: {not placement.tensors}",
    )
    reserved_extra = torch.cuda.memory_reserved(dev) - hog_alloc
    report(None, f"torch reserved beyond the filler after rollback: {reserved_extra:,} B")
    del hog
    torch.cuda.empty_cache()
    after_alloc = torch.cuda.memory_allocated(dev)
    after_nvml = nvml_used(mon)
    ctx = results.get("cuda_context_bytes", 600 * MiB)
    report(
        after_alloc == base_alloc,
        f"memory_allocated back to baseline: {after_alloc:,} B (baseline {base_alloc:,} B)",
    )
    report(
        base_nvml >= 0 and abs(after_nvml - base_nvml) <= max(ctx, 64 * MiB),
        f"NVML used back to {after_nvml / MiB:.0f} MiB (baseline {base_nvml / MiB:.0f} MiB, CUDA context {ctx / MiB:.0f} MiB)",
    )
    # and the move works once memory is back
    result = placement.move(names, "cuda:0")
    report(result.moved == len(names), f"the same move after freeing memory: {result.message}")
    placement.release()
    del err, placement
    gc.collect()
    torch.cuda.empty_cache()


# -- the estimate against a real training step -----------------------------------------------------
def train_once(precision: str, optimizer: str, trainable: set[str], fused: bool = False) -> dict:
    import torch

    from modelscope_tui.training.estimate import PRECISIONS

    spec = PRECISIONS[precision]
    dtype = {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        None: None,
    }[spec.weights]
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    with torch.device(TRAIN_DEVICE):
        model = gpt_model()
    if dtype is not None:
        model.to(dtype)
    for name, p in model.named_parameters():  # tied: one Parameter, listed under its first name
        p.requires_grad_(name in trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    master = (
        [p.detach().float().clone() for p in params]
        if spec.master and optimizer != "none"
        else None
    )
    opt_params = master if master is not None else params
    opt = None
    if optimizer != "none" and opt_params:
        kw = {"fused": True} if fused else {}
        if optimizer == "adamw":
            opt = torch.optim.AdamW(opt_params, lr=1e-5, **kw)
        elif optimizer == "adam":
            opt = torch.optim.Adam(opt_params, lr=1e-5, **kw)
        elif optimizer == "sgd-momentum":
            opt = torch.optim.SGD(opt_params, lr=1e-5, momentum=0.9, **kw)
        else:
            opt = torch.optim.SGD(opt_params, lr=1e-5, **kw)
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    x = torch.randint(0, GPT["vocab"], (1, 8), device=TRAIN_DEVICE)
    if optimizer == "none":
        with torch.no_grad():
            model(x)
        opt_peak = 0
    else:
        ctx = (
            torch.autocast(TRAIN_DEVICE, dtype=torch.bfloat16)
            if precision == "amp"
            else torch.autocast(TRAIN_DEVICE, enabled=False)
        )
        with ctx:
            loss = model(x).float().mean()
        loss.backward()
        del loss
        torch.cuda.synchronize()
        fwd_bwd_peak = torch.cuda.max_memory_allocated() - base
        before_step = torch.cuda.memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        if master is not None:
            for m, p in zip(master, params):
                m.grad = p.grad.float()  # DeepSpeed/apex keep fp32 grads for the step
        if opt is not None:
            opt.step()
        if master is not None:
            for m, p in zip(master, params):
                p.data.copy_(m.data)
                m.grad = None
        torch.cuda.synchronize()
        opt_peak = torch.cuda.max_memory_allocated() - base
    torch.cuda.synchronize()
    steady = torch.cuda.memory_allocated() - base
    out = {
        "weights_setup": weights,
        "steady": steady,
        "step_peak": opt_peak,
        "fwd_bwd_peak": fwd_bwd_peak
        if optimizer != "none"
        else torch.cuda.max_memory_allocated() - base,
        "before_step": before_step if optimizer != "none" else steady,
    }
    del model, params, master, opt_params, opt, x
    gc.collect()
    torch.cuda.empty_cache()
    return out


def check_estimate(path: Path) -> None:
    from modelscope_tui import open_checkpoint
    from modelscope_tui.training.estimate import OPTIMIZERS, PRECISIONS, estimate_for_session
    from modelscope_tui.training.session import Session

    ckpt = open_checkpoint(path)
    full = Session(ckpt)
    half = Session(ckpt)
    half.freeze_all()
    half.train_last_n_blocks(GPT["layers"] // 2)
    rows = []
    t0 = time.monotonic()
    for label, session in (("full", full), ("last half", half)):
        trainable = {n for n in session.records if session.is_trainable(n)}
        for precision in PRECISIONS:
            for optimizer in OPTIMIZERS:
                est = estimate_for_session(session, precision, optimizer)
                m = train_once(precision, optimizer, trainable)
                row = {
                    "freeze": label,
                    "precision": precision,
                    "optimizer": optimizer,
                    "estimate": est.total,
                    "weights": est.weights,
                    "gradients": est.gradients,
                    "master": est.master_weights,
                    "states": est.optimizer_states,
                    "trainable": est.trainable,
                    **m,
                }
                if (
                    optimizer in ("adamw", "sgd-momentum")
                    and label == "full"
                    and precision in ("fp32", "bf16")
                ):
                    try:
                        row["fused_step_peak"] = train_once(
                            precision, optimizer, trainable, fused=True
                        )["step_peak"]
                    except (RuntimeError, TypeError, ValueError) as exc:
                        report(None, f"fused {optimizer} unavailable: {exc}")
                row["estimate_peak"] = est.peak
                rows.append(row)
                err_steady = (m["steady"] - est.total) / est.total * 100
                err_peak = (m["step_peak"] - est.peak) / est.peak * 100 if m["step_peak"] else 0.0
                report(
                    None,
                    f"estimate {label:9} {precision:10} {optimizer:12} est {est.total / GiB:6.2f} / peak {est.peak / GiB:6.2f} GiB | after step"
                    f" {m['steady'] / GiB:6.2f} GiB ({err_steady:+5.1f}%) | step peak {m['step_peak'] / GiB:6.2f} GiB ({err_peak:+5.1f}%)"
                    f" | fwd+bwd peak {m['fwd_bwd_peak'] / GiB:6.2f} GiB"
                    + (
                        f" | fused step peak {row['fused_step_peak'] / GiB:.2f} GiB"
                        if "fused_step_peak" in row
                        else ""
                    ),
                )
    results["estimate_rows"] = rows
    trained = [r for r in rows if r["optimizer"] != "none"]
    worst_peak = max(abs(r["step_peak"] - r["estimate_peak"]) / r["estimate_peak"] for r in trained)
    report(
        worst_peak <= 0.10,
        f"estimate peak vs the optimizer step's peak: worst error {worst_peak * 100:.1f}% over {len(trained)} training rows",
    )
    worst = max(abs(r["steady"] - r["estimate"]) / r["estimate"] for r in rows)
    report(
        worst <= 0.10,
        f"estimate vs memory held after a training step: worst error {worst * 100:.1f}% over {len(rows)} rows ({time.monotonic() - t0:.0f} s)",
    )


# -- the explorer on a real GPU ----------------------------------------------------------------------
def check_panel(path: Path, seconds: float) -> None:
    import asyncio

    from modelscope_tui.tui.app import MscopeApp
    from modelscope_tui.tui.widgets.gpu_panel import GpuPanel

    ticks: list[float] = []
    real_sample = NvmlBackend.sample

    def timed(self):
        t0 = time.perf_counter()
        try:
            return real_sample(self)
        finally:
            ticks.append(time.perf_counter() - t0)

    NvmlBackend.sample = timed

    def panel_text(app) -> str:
        from rich.console import Console

        panel = app.query_one("#gpu-panel", GpuPanel)
        console = Console(width=max(20, panel.size.width - 2), record=True, file=io.StringIO())
        console.print(panel.render_panel())
        return console.export_text()

    async def move_with_m(pilot, option_list, ids) -> None:
        app = pilot.app
        option_list.highlighted = ids.index("cuda:0")
        t0 = time.perf_counter()
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        took = time.perf_counter() - t0
        header = str(app.query_one("#header").render())
        placed = app.placement.bytes_by_device() if app.placement else {}
        report(
            "cuda:0" in placed and "cuda:0" in header,
            f"explorer `m` -> cuda:0 in {took:.1f} s: placed {placed}; header mentions cuda:0: {'cuda:0' in header}",
        )
        await pilot.pause(1.5)
        text = panel_text(app)
        report(
            "placed: cuda:0" in " ".join(text.split()) or "cuda:0" in text,
            "panel shows the placement",
        )

    async def run() -> None:
        app = MscopeApp(path, gpu_interval=1.0, show_gpus=True)
        async with app.run_test(size=(160, 48)) as pilot:
            await pilot.app.workers.wait_for_complete()
            for _ in range(100):
                if app.query_one("#gpu-panel", GpuPanel).sample is not None:
                    break
                await pilot.pause(0.05)
            text = panel_text(app)
            report(
                "GPU 0" in text and "SIMULATED" not in text,
                f"panel shows the real GPU: {text.splitlines()[0] if text else ''!r}",
            )
            # the real `m`: device list, cuda:0, enter
            await pilot.press("m")
            await app.workers.wait_for_complete()  # the device list comes from a worker
            await pilot.pause()
            option_list = app.screen.query_one("OptionList")
            ids = [option_list.get_option_at_index(i).id for i in range(option_list.option_count)]
            if "cuda:0" not in ids or option_list.get_option("cuda:0").disabled:
                report(False, f"device list offers no usable cuda:0: {ids}")
                await pilot.press("escape")
            else:
                await move_with_m(pilot, option_list, ids)
            # idle: tick time and CPU, first while the sparkline still grows (a repaint a
            # tick), then once it is full (an idle GPU changes nothing on screen)
            panel = app.query_one("#gpu-panel", GpuPanel)
            for phase, length in (("filling", seconds), ("steady", seconds * 2 / 3)):
                ticks.clear()
                repaints = []
                real_refresh = panel.refresh
                panel.refresh = lambda *a, _r=real_refresh, _n=repaints, **k: (
                    _n.append(1),
                    _r(*a, **k),
                )[1]
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                w0 = time.monotonic()
                await pilot.pause(length)
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                panel.refresh = real_refresh
                wall = time.monotonic() - w0
                cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
                med = statistics.median(ticks) * 1e3 if ticks else float("nan")
                results.setdefault("panel", {})[phase] = {
                    "ticks_ms": [t * 1e3 for t in ticks],
                    "cpu_s": cpu,
                    "wall_s": wall,
                    "repaints": len(repaints),
                }
                report(
                    bool(ticks) and med < 5.0,
                    f"panel idle ({phase}) {wall:.0f} s: {len(ticks)} NVML ticks, median {med:.2f} ms, max {max(ticks, default=0) * 1e3:.2f} ms (target < 5 ms)",
                )
                report(
                    cpu / wall < 0.02,
                    f"panel idle ({phase}): the whole process used {cpu:.2f} s CPU in {wall:.0f} s = {cpu / wall * 100:.2f}% of one core, {len(repaints)} panel repaints (target < 2%)",
                )
            # a second process allocates 4 GiB: it must show within one refresh
            g_before = app.query_one("#gpu-panel", GpuPanel).sample.by_cuda_index(0)
            used_before = g_before.memory_used
            code = (
                "import torch,sys,time; x=torch.empty(4<<30,dtype=torch.uint8,device='cuda');"
                "torch.cuda.synchronize(); print('ready',flush=True); time.sleep(60)"
            )
            child = subprocess.Popen(
                [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
            )
            try:
                loop = asyncio.get_running_loop()
                line = await loop.run_in_executor(None, child.stdout.readline)
                ready = time.monotonic()
                seen = None
                while time.monotonic() - ready < 5:
                    g = app.query_one("#gpu-panel", GpuPanel).sample.by_cuda_index(0)
                    if (
                        g is not None
                        and g.memory_used is not NA
                        and g.memory_used - used_before >= 4 * GiB - 64 * MiB
                    ):
                        seen = time.monotonic() - ready
                        break
                    await pilot.pause(0.02)
                text = panel_text(app)
                listed = str(child.pid) in text
                results["second_process"] = {
                    "ready": line.strip(),
                    "seen_after_s": seen,
                    "pid_listed": listed,
                }
                report(
                    seen is not None and seen <= 1.0 + 0.1,
                    f"second process (pid {child.pid}) allocating 4 GiB seen in the panel after {seen if seen is None else round(seen, 2)} s (refresh 1 s); its pid listed: {listed}",
                )
            finally:
                child.kill()
                child.wait()
        return None

    try:
        asyncio.run(run())
    finally:
        NvmlBackend.sample = real_sample
    import torch as _t

    _t.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--full", action="store_true", help="also the GPT-2-medium checks (4-7)")
    ap.add_argument("--out", type=Path, help="write gpu_check.json here")
    ap.add_argument("--panel-seconds", type=float, default=30.0)
    ap.add_argument(
        "--only",
        default="",
        help="comma list of: smi,visible,torch,thread,cli,move,oom,estimate,panel",
    )
    ap.add_argument("--mapping-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mapping_child:
        return mapping_child()
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
    only = {x for x in args.only.split(",") if x}

    def want(name: str) -> bool:
        return not only or name in only

    def run(name: str, fn, *a) -> object:
        if not want(name):
            return None
        t0 = time.monotonic()
        try:
            return fn(*a)
        except Exception as exc:  # one broken check must not hide the others
            import traceback

            traceback.print_exc()
            report(False, f"{name} raised {type(exc).__name__}: {exc}")
        finally:
            results.setdefault("seconds", {})[name] = round(time.monotonic() - t0, 2)
            if args.out is not None:  # after every check, so a run cut short still reports
                args.out.mkdir(parents=True, exist_ok=True)
                results["failures"] = failures
                (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
        return None

    run("smi", check_against_smi, mon)
    run("visible", check_visible_devices, mon)
    run("thread", check_thread, mon)
    cuda = run("torch", check_torch, mon)
    run("cli", check_cli)
    if args.full and cuda is not False:
        with tempfile.TemporaryDirectory() as tmp:
            path = None
            if any(want(n) for n in ("move", "oom", "estimate", "panel")):
                path = make_gpt_file(Path(tmp))
            if path is not None:
                run("move", check_move, path)
                run("oom", check_oom, path, mon)
                run("estimate", check_estimate, path)
                run("panel", check_panel, path, args.panel_seconds)
    mon.close()
    took = time.monotonic() - started
    print(f"{'FAIL' if failures else 'PASS'}: {len(failures)} failure(s) in {took:.1f} s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        results["failures"] = failures
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
