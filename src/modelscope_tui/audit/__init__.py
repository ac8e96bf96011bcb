"""Checkpoint audits: integrity, load-ability, waste, duplicates and (streamed) value statistics.

- findings.py: the code registry `CODES`, `Severity`, `Finding`, `AuditReport` (verdict, JSON).
- checks.py: the `Check` base class (subclasses register themselves) and `AuditRun` (options).
- integrity.py, loadability.py, waste.py, duplicates.py, statistics.py: one family of checks
  each; norms.py: norm profiles (per block for the audit, per child module for the explorer).
- runner.py: `run_audit(ckpt, ...)` and `audit_path(path, ...)`.

Rendering lives in cli/audit.py and the explorer; nothing here imports rich or argparse.
"""
