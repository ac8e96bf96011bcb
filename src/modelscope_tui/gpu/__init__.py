"""GPU monitor: NVML snapshots on a timer, matched to torch's CUDA indices; no Textual here.

One idea per module, bottom up (import the module you need; this package re-exports nothing,
so `schema` stays cheap for `mscope gpus --help`):

- `na`: `NA`, the sentinel for a figure a GPU cannot give (NVML `NotSupported`, `NoPermission`,
  an old driver without the function, ...). It renders as "n/a", is falsy, and becomes `null` in
  JSON. No query raises for such a figure.
- `cuda`: which NVML GPU (and MIG device) is which `cuda:N` in this process (`CudaMapping`),
  worked out from `CUDA_VISIBLE_DEVICES` without initialising CUDA, or from torch once it has.
- `snapshot`: frozen snapshots: `GpuSample` (one tick: every GPU, host RAM, a status line)
  holding `GpuSnapshot`s (one GPU) with `GpuProcess`es, `MigDevice`s and, when this process has
  initialised CUDA, `TorchMemory`.
- `host`: host RAM and process names from /proc.
- `backend`: what every backend promises (`GpuBackend`: `sample() -> GpuSample`, which never
  raises) and the failure states it reports instead of raising.
- `nvml`: `NvmlBackend` (nvidia-ml-py, imported lazily, initialised once under a lock).
- `simulated`: `SimulatedBackend` (deterministic fake GPUs for tests and demos; everything it
  returns says SIMULATED).
- `monitor`: `GpuMonitor`: one batched sample per tick on a daemon thread, handed to a callback,
  plus a bounded history of memory used per GPU for sparklines. `GpuMonitor.from_env()` picks
  the simulated backend when `MSCOPE_SIMULATE_GPUS=N` is set.
- `schema`: the `mscope gpus --json` document (`mscope.gpus` v1).

`mscope gpus` (arguments, text rendering with rich) lives in `cli/gpus.py`, the GPU panel in
`tui/widgets/gpu_panel.py`. docs/gpu-backend.md says why this is our own NVML layer and not
`nvitop.api`.

Failure states are values, not exceptions: `sample.state` is one of `snapshot.STATES`,
`sample.status` is the plain-words line to show, and `sample.host` always carries host RAM
figures so a panel has something to show when there is no GPU.
"""
