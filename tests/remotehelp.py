"""What the remote tests share: the CLI in-process (stdout, stderr, exit code) and a JSON
comparison with the file identity fields normalised."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

# Fields that name the file or time the run: they differ between a local and a remote run.
VOLATILE = {"file", "seconds", "path", "a", "b", "file_a", "file_b"}


def run_main(*argv: str) -> tuple[int, str, str]:
    from modelscope_tui.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def normalised(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: ("<volatile>" if k in VOLATILE else normalised(v)) for k, v in doc.items()}
    if isinstance(doc, list):
        return [normalised(v) for v in doc]
    return doc


def same_json(local: str, remote: str) -> None:
    """Equal field by field, but for the file names and timings (a failure names the first field)."""
    a, b = normalised(json.loads(local)), normalised(json.loads(remote))
    _walk(a, b, "")


def _walk(a: Any, b: Any, where: str) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            _walk(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            _walk(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: local {a!r} != remote {b!r}"
