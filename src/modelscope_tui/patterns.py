"""Regular expressions from users and plan files, compiled so they cannot backtrack for ages.

Python's `re` backtracks and cannot be interrupted from Python, and the stdlib has no linear-time
engine (RE2). A time budget would need a subprocess per search; instead the pattern's shape is
checked before it runs, and every construct that makes backtracking exponential is refused with
a one-line error:

- a quantifier (`*`, `+`, `{m,n}` with n > 1) whose body holds another such quantifier:
  `(a+)+`, `(a*b?)*`, `(.*,)*`;
- a quantifier over an alternation: `(a|aa)+`, `(x|x)*` (branches may match the same text);
- backreferences (`\\1`, `(?P=name)`): matching with them is NP-hard in general;
- more than MAX_QUANTIFIERS unbounded quantifiers in all (`a*a*a*$` is polynomial of that
  degree, times the name length for a search), and patterns longer than MAX_PATTERN characters.

What is left runs in time polynomial of low degree in the name length, and names are short;
search_names() also stops a search over many names once it has used SEARCH_BUDGET_S.
Freeze patterns are names and numbers (`blocks\\.(1[0-9]|2[0-3])\\.`, `.*norm.*`), which pass.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

try:  # Python 3.11+: the parser moved under re, the old module warns
    from re import _constants as _sre_constants  # noqa: PLC2701
    from re import _parser as _sre_parse  # noqa: PLC2701
except ImportError:  # pragma: no cover
    import sre_constants as _sre_constants  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

from .errors import MscopeError

MAX_PATTERN = 1000
MAX_QUANTIFIERS = 2  # `.*norm.*`; searching adds a factor of the name length

_REPEATS = {_sre_constants.MAX_REPEAT, _sre_constants.MIN_REPEAT}
_POSSESSIVE = getattr(_sre_constants, "POSSESSIVE_REPEAT", None)
if _POSSESSIVE is not None:
    _REPEATS.add(_POSSESSIVE)
_GROUPREFS = {
    getattr(_sre_constants, name)
    for name in ("GROUPREF", "GROUPREF_EXISTS", "GROUPREF_IGNORE", "GROUPREF_LOC_IGNORE", "GROUPREF_UNI_IGNORE")
    if hasattr(_sre_constants, name)
}


def glob_matches(name: str, pattern: str) -> bool:
    """The one glob rule of mscope (summary filters, freeze patterns, plan rules): `pattern`
    matches the name itself or a module above it (`pattern` or `pattern.*`), case-sensitively."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def glob_condition(pattern: str) -> str:
    """glob_matches as Python source over a variable `name` (for the generated freeze snippet,
    which runs without mscope and needs `import fnmatch`)."""
    return f"fnmatch.fnmatchcase(name, {pattern!r}) or fnmatch.fnmatchcase(name, {pattern + '.*'!r})"


class PatternError(MscopeError):
    """A regular expression that is invalid or could backtrack catastrophically."""


def compile_safe_regex(pattern: str) -> re.Pattern[str]:
    """`re.compile(pattern)` after the shape checks above; PatternError (one line) if refused."""
    if not isinstance(pattern, str):
        raise PatternError(f"a regular expression must be text, not {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN:
        raise PatternError(f"regular expression longer than {MAX_PATTERN} characters")
    try:
        parsed = _sre_parse.parse(pattern)
        compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise PatternError(f"invalid regular expression {pattern!r}: {exc}") from None
    problem = _problem(parsed)
    if problem is None:
        unbounded = _count_unbounded(parsed)
        if unbounded > MAX_QUANTIFIERS:
            problem = f"{unbounded} unbounded quantifiers (at most {MAX_QUANTIFIERS})"
    if problem:
        raise PatternError(
            f"regular expression {pattern!r} refused: {problem} can backtrack for a very long time",
            hint="use a glob, or a simpler regex such as blocks\\.(1[0-9]|2[0-3])\\.",
        )
    return compiled


def _items(node: Any):
    """The (op, av) items of a parsed (sub)pattern."""
    return list(node.data if hasattr(node, "data") else node)


def _children(op: Any, av: Any) -> list[Any]:
    """Sub-patterns under one item (groups, branches, repeats, lookarounds, conditionals)."""
    if op in _REPEATS:
        return [av[2]]
    if op == _sre_constants.SUBPATTERN:
        return [av[-1]]
    if op == _sre_constants.BRANCH:
        return list(av[1])
    if op in (_sre_constants.ASSERT, _sre_constants.ASSERT_NOT):
        return [av[1]]
    if hasattr(_sre_constants, "ATOMIC_GROUP") and op == _sre_constants.ATOMIC_GROUP:
        return [av]
    if op in _GROUPREFS and isinstance(av, tuple) and len(av) == 3:  # (?(1)yes|no)
        return [x for x in av[1:] if x is not None]
    return []


def _is_multi(op: Any, av: Any) -> bool:
    return op in _REPEATS and (av[1] is _sre_constants.MAXREPEAT or av[1] > 1)


def _problem(node: Any, inside_repeat: bool = False) -> str | None:
    for op, av in _items(node):
        if op in _GROUPREFS:
            return "a backreference"
        multi = _is_multi(op, av)
        if op in _REPEATS and inside_repeat:  # (x?)+ too: an optional body repeated
            return "a quantifier inside a quantifier"
        if op == _sre_constants.BRANCH and inside_repeat:
            return "an alternation under a quantifier"
        for child in _children(op, av):
            found = _problem(child, inside_repeat or multi)
            if found:
                return found
    return None


def _count_unbounded(node: Any) -> int:
    total = 0
    for op, av in _items(node):
        if op in _REPEATS and av[1] is _sre_constants.MAXREPEAT:
            total += 1
        for child in _children(op, av):
            total += _count_unbounded(child)
    return total


SEARCH_BUDGET_S = 5.0


def search_names(rx: re.Pattern[str], names: list[str], budget_s: float = SEARCH_BUDGET_S) -> list[str]:
    """The names `rx` finds (re.search), stopping with PatternError when the whole search has
    taken more than `budget_s` (checked between names: the shape checks bound each one)."""
    import time

    deadline = time.monotonic() + budget_s
    out = []
    for i, name in enumerate(names):
        if rx.search(name):
            out.append(name)
        if i & 255 == 255 and time.monotonic() > deadline:
            raise PatternError(
                f"regular expression {rx.pattern!r} took over {budget_s:g} s on {i + 1:,} names; stopped",
                hint="use a glob or a simpler regex",
            )
    return out
