"""New files from a checkpoint, never touching the source: every write goes through
`atomic.atomic_write` (temp file in the same directory, fsync, rename; an existing file only
when asked, then kept as `.bak`).

- atomic: atomic files, sibling names, copying from a source that must not change meanwhile;
- requires_grad: a full-module checkpoint with other requires_grad flags (byte patches);
- remap: storages moved to another device (location strings in the pickle);
- cast: the model part cast to another dtype, as a torch zip or safetensors;
- zipwriter: the zip layout torch itself writes (remap and cast write through it).
"""
