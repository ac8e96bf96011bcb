"""Pickles, parsed and never executed.

- `opcodes`: the one table of opcodes (argument, stack effect, what the scan charges) and the one
  tokenizer that every opcode walker below reads them with.
- `scan`: the opcode pre-scan every pickle passes before anything is built from it (lengths, memo
  indices, memory, nesting, hash flooding); `scan_exact` is the specification, picklescan.c its
  compiled mirror.
- `unpickler`: CPython's C unpickler with every global replaced by a data-only stand-in or an
  inert record; `safe_load` is the one way mscope unpickles.
- `patch`: symbolic walks that find the bytes of requires_grad flags and storage locations, and
  rewrite them in place.
"""
