"""Human-readable sizes and counts, shared by the CLI and the TUI."""

from __future__ import annotations


def fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def fmt_count(n: int) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def fmt_bytes_short(n: int) -> str:
    """fmt_bytes with two or three significant digits, for narrow tables: `413 MB`, `85 KB`,
    `1.6 GB`."""
    text = fmt_bytes(n)
    number, _, unit = text.partition(" ")
    if unit != "B" and float(number) >= 10:
        return f"{float(number):.0f} {unit}"
    return text
