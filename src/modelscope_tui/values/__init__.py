"""Tensor values: the one layer that reads tensor bytes. Everything above it (audit, diff, the
norm profile, the explorer) imports from these modules and from nowhere else for values.

- data.py: `TensorData` maps each file once (mmap) and hands out storages, addresses and tensors
  (the only place torch is imported for data); `check_view` guards every use of file numbers.
- chunks.py: `LAYOUT` (how each dtype is read) and `TensorChunks`, a record cut into chunks.
- kernels.py: one chunk's statistics as a `Part`: the compiled kernel (statkernel.py binding
  statkernel.c), else numpy; half-precision widening and moments.
- stats.py: `TensorStats` and its flags, `Histogram`, `Progress`: plain records, no numpy.
- stream.py: `tensor_stats`, `tensor_histogram`, `stream_stats` (thread pool, progress, cancel).
- digest.py: `digest`, `same_bytes`, `is_constant`: tensors compared by their bytes.
"""
