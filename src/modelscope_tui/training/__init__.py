"""Preparing a fine-tune from checkpoint metadata, without torch at import time.

- session: the one mutable state (which parameters train, eval-mode norms, undo), and the
  rule vocabulary (Action, Selector) that plans record;
- plan: the freeze-plan file (write, read, validate); fingerprint: which model a plan is for;
  apply: a plan onto a Session or a live nn.Module; snippet: a plan as plain-PyTorch source;
- estimate: memory for the model states per precision and optimizer;
- placement: tensors materialised on a torch device; devicemap: Hugging Face device maps.

Files are written through write.atomic; nothing here imports from cli/ or tui/.
"""
