"""JSON in one place: small side files (plans, device maps) read with one-line errors, never a
traceback, and the one encoder of every `--json` output (compact_json; json_number and jsonable
spell non-finite floats as strings)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import MscopeError

MAX_JSON_BYTES = 64 << 20


def read_json_file(
    path: str | os.PathLike, error: type[MscopeError], what: str, limit: int = MAX_JSON_BYTES
) -> Any:
    """Parse `path` as JSON; any problem raises `error` naming the file and saying it is not `what`.
    The one reader of JSON side files: plans, device maps, shard indexes, DCP/HF configs."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise error(f"too large for {what} ({size:,} bytes, over the {limit:,} allowed)", path)
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error("no such file", path) from None
    except IsADirectoryError:
        raise error(f"is a directory, not {what}", path) from None
    except UnicodeDecodeError:
        raise error(f"not {what} (not UTF-8 text)", path) from None
    except OSError as exc:
        raise error(f"cannot read: {exc.strerror or exc}", path) from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"not valid JSON ({exc.msg} at line {exc.lineno})", path) from None
    except ValueError as exc:  # e.g. an integer past Python's 4,300-digit conversion limit
        raise error(f"not valid JSON ({str(exc)[:80]})", path) from None
    except RecursionError:
        raise error(f"not {what} (JSON nested too deeply)", path) from None


def json_bytes(value: Any, **kwargs: Any) -> bytes:
    """`value` as UTF-8 JSON, readable as text (non-ASCII names kept as they are). A lone
    surrogate (a name decoded from a pickle's raw bytes) has no UTF-8 spelling: then the whole
    document is written ASCII-escaped (`\\ud800`), which every JSON reader parses back to the
    same string, instead of failing with UnicodeEncodeError."""
    text = json.dumps(value, ensure_ascii=False, **kwargs)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, **kwargs).encode("ascii")


def compact_json(value: Any, allow_nan: bool = True) -> str:
    """The one encoder of every `--json` output: no spaces, ASCII (controls and non-ASCII names
    escaped, so a terminal never sees raw file text). allow_nan=False for documents whose schema
    says numbers are finite (a NaN there is a bug, not data)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=allow_nan)


def json_number(x: float | None) -> float | str | None:
    """JSON numbers; non-finite ones as the strings "nan", "inf", "-inf" (strict JSON)."""
    if x is None:
        return None
    if math.isfinite(x):
        return x
    return "nan" if x != x else ("inf" if x > 0 else "-inf")


def jsonable(value: Any) -> Any:
    """`value` with every float through json_number, dict keys as strings and anything else that
    JSON has no type for as its str(): safe for compact_json(allow_nan=False)."""
    if isinstance(value, float):
        return json_number(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)
