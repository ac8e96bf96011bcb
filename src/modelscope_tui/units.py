"""Human-readable sizes and counts, shared by the CLI and the TUI."""

from __future__ import annotations

from collections.abc import Iterable

BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def fmt_bytes(n: int) -> str:
    """A size in binary units with their IEC names (`1.3 GiB` is 1.3 x 2**30 bytes): the one
    convention of every text, screen and message. JSON keeps bytes."""
    size = float(n)
    for unit in BYTE_UNITS:
        if round(size, 1) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def fmt_count(n: int) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def percent(part: int, whole: int) -> str:
    """part/whole in percent, with the decimals it takes to read 100% or 0% only when it is."""
    if not whole:
        return "0.0%"
    pct = 100.0 * part / whole
    for decimals in range(1, 7):
        text = f"{pct:.{decimals}f}"
        if (part == whole or float(text) < 100) and (part == 0 or float(text) > 0):
            break
    return f"{text}%"


def count_pair(part: int, whole: int) -> str:
    """`1.6K / 2.2K`; exact (`1,584 / 1,600`) when the compact forms would read the same but
    the counts differ: freezing one BatchNorm must show. The one rule for a part of a whole
    (the explorer's header, plan and estimate text)."""
    a, b = fmt_count(part), fmt_count(whole)
    if a == b and part != whole:
        return f"{part:,} / {whole:,}"
    return f"{a} / {b}"


def fmt_bytes_short(n: int) -> str:
    """fmt_bytes with two or three significant digits, for narrow tables: `413 MiB`, `85 KiB`,
    `1.6 GiB`."""
    text = fmt_bytes(n)
    number, _, unit = text.partition(" ")
    if unit != "B" and float(number) >= 10:
        return f"{float(number):.0f} {unit}"
    return text


def shorten(name: str, width: int, siblings: Iterable[str] = ()) -> str:
    """The one sibling-safe shortening (the explorer's tree, `audit --stats` text).

    `name` in `width` cells, told apart from its siblings: a middle ellipsis keeps both ends
    (`in_pr…weight` / `in_pr…j_bias`, `q_p…oj` / `k_p…oj`), with the cut moved until no other
    sibling that is shortened too could read the same; when only the middle differs, a window
    around the difference (`…attn…`). Siblings that fit are shown whole and never contain it."""
    if len(name) <= width:
        return name
    if width <= 1:
        return "…"[:width]
    keep = width - 1
    others = [o for o in siblings if o != name and len(o) > width]
    whole = {o for o in siblings if len(o) <= width}
    # For each other long sibling: how many leading and trailing characters it shares with
    # `name`. A cut keeping h leading and t trailing ones reads the same as that sibling's
    # cut with the same split exactly when h <= prefix and t <= suffix.
    shared = [(common_prefix(name, o), common_prefix(name[::-1], o[::-1])) for o in others]
    head0 = keep // 2  # the tail gets the extra cell: weight/bias, mean/var differ at the end
    for h in sorted(range(keep + 1), key=lambda h: (abs(h - head0), -h)):
        t = keep - h
        if not any(h <= p and t <= q for p, q in shared):
            text = name[:h] + "…" + (name[-t:] if t else "")
            if text not in whole:
                return text
    # Only the middle tells them apart: show a window of it between two ellipses.
    span = width - 2
    if span >= 1:
        first = max((p for p, _ in shared), default=0)
        starts = sorted(range(1, len(name) - span), key=lambda i: abs(i - (first - span // 2)))
        for i in starts:
            window = name[i : i + span]
            if not any(window in o for o in others):
                return "…" + window + "…"
    return name[:head0] + "…" + name[-(keep - head0) :]


def common_prefix(a: str, b: str) -> int:
    """How many leading characters `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# Every character a terminal may act on instead of showing: C0/C1 controls and DEL (Cc), bidi
# overrides/isolates/marks and zero-width characters (Cf), lone surrogates (Cs), line and
# paragraph separators (Zl, Zp), unassigned and private-use code points. str.isprintable() is
# False for exactly these classes (and for non-ASCII spaces, which we escape too: they disguise
# names), so it is the C-speed fast path and the rule in one.
def safe_text(text: object, *, multiline: bool = False) -> str:
    """`text` as a terminal shows it literally: each unsafe character becomes a visible
    escape (`\\x1b`, `\\u202e`, `\\ud800`), so file-controlled names, keys, metadata and global
    names can neither drive the terminal (ESC/OSC/CSI, C1 0x9b), reorder or hide what is
    shown (bidi, zero-width), nor crash an encoder (a lone surrogate).

    multiline=True keeps newlines and tabs (for whole blocks of our own output); a single
    field from a file is always one line. JSON output does not use this: it keeps strings
    exact, escaped by the JSON encoder (ASCII only, `\\u001b`, `\\ud800`)."""
    s = text if isinstance(text, str) else str(text)
    if s.isprintable():
        return s
    if multiline:
        return "".join(c if c.isprintable() or c in "\n\t" else _escape_char(c) for c in s)
    return "".join(c if c.isprintable() else _escape_char(c) for c in s)


def _escape_char(c: str) -> str:
    # unicode_escape spells C0/C1/DEL as \xNN, BMP characters (surrogates included) as \uNNNN
    # and the rest as \UNNNNNNNN: always ASCII, always visible.
    return c.encode("unicode_escape", "backslashreplace").decode("ascii")


SPARK = "▁▂▃▄▅▆▇█"  # eight levels, lowest first


def sparkline(
    values: Iterable[float],
    width: int | None = None,
    *,
    top: float | None = None,
    fit: bool = False,
    floor: bool = False,
) -> str:
    """One block character per value: the one sparkline of mscope (GPU memory, norm profiles).

    `width` keeps the last `width` values (all when None). The scale runs from 0 to `top`
    (default, or when `top` is 0: the largest value; nothing above 0 draws the lowest cell), or
    with `fit` from the smallest value to the largest (all equal: the middle cell). A value takes
    the nearest of the eight levels, or with `floor` the eighth of the scale it falls in.
    """
    vals = list(values)
    if width is not None:
        vals = vals[-width:]
    if not vals:
        return ""
    last = len(SPARK) - 1
    if fit:
        lo, hi = min(vals), max(vals)
        if hi <= lo:
            return SPARK[3] * len(vals)
        span = hi - lo
        scaled = [(v - lo) / span for v in vals]
    else:
        hi = top if top else max(vals)
        if hi <= 0:
            return SPARK[0] * len(vals)
        scaled = [v / hi for v in vals]
    if floor:
        return "".join(SPARK[min(last, max(0, int(x * 7.999)))] for x in scaled)
    return "".join(SPARK[min(last, max(0, int(x * last + 0.5)))] for x in scaled)
