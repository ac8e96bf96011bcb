"""Compare two checkpoints of any supported formats, tensor by tensor, streamed and chunked.

- `stream.diff_checkpoints(a, b, atol=1e-8, rtol=1e-5, ...) -> DiffReport`: every model tensor
  matched by name (sections too with `sections="all"`); added, removed, renamed-looking (same
  shape and dtype, identical bytes under another name, those bytes unique among A's removed and
  B's added tensors), shape- or dtype-changed; requires_grad changes where both files store the
  flag; for common tensors identical (bit for bit) / close (within atol + rtol * |b| everywhere,
  like torch.allclose) / changed, with max |a - b|, relative L2 difference ||a - b|| / ||a|| and
  cosine similarity. `DiffReport.modules` sums that up per module.
- `stream.DiffStream(a, b, ...)`: the same diff in steps (metadata first, then values);
  `live.LiveDiff(stream)` keeps the latest status of every tensor and module for a view.
- `plan.check_plan(diff, plan) -> PlanCheck`: were the parameters a freeze plan froze left alone?
- report.py: statuses and result records; pairing.py: names matched across the files;
  compare.py: two tensors' values in lockstep.

Memory is bounded by the chunk size: both tensors are read in lockstep, chunk by chunk, through
the value layer's mmap views. No Textual, no rich; torch only for float8 tensors. The text report
is cli/diff.py's.
"""
