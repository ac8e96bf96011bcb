"""Names (issue #12, section 2): a few names of 10,000 dots took minutes and 2 GB, and --json
wrote 500 MB; a flat state dict of 100k names took 39 s in the text summary.

Names are capped at MAX_NAME_CHARS (a digest keeps cut names distinct) and the implied module
tree at MAX_NAME_DEPTH; both are reported. Work is asserted in characters and rows, not seconds.
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from craft import (  # noqa: E402
    EMPTY_DICT,
    MARK,
    PROTO2,
    SETITEM,
    SETITEMS,
    STOP,
    state_pickle,
    storage,
    tensor,
    torch_zip,
    uni,
)  # fmt: skip

from modelscope_tui.checkpoint import MAX_NAME_CHARS, MAX_NAME_DEPTH, is_cut  # noqa: E402
from modelscope_tui.cli.summary import render_summary  # noqa: E402
from modelscope_tui.readers import open_checkpoint  # noqa: E402
from modelscope_tui.summary import AUTO_MAX_CHILDREN, summary_json_chunks  # noqa: E402
from modelscope_tui.textout import text_console  # noqa: E402

BINPUT, BINGET = b"q", b"h"
T = tensor(storage("0", 4), 0, (4,), (1,))
DATA = {"0": bytes(16)}


def _module_chars(ckpt) -> int:
    return sum(len(node.name) for node in ckpt.tree.walk())


def _check(ckpt, n_tensors: int) -> None:
    assert len(ckpt.tensors) == n_tensors
    assert all(len(t.name) <= MAX_NAME_CHARS for t in ckpt.tensors)
    depth = max((node.name.count(".") + 1 for node in ckpt.tree.walk() if node.name), default=0)
    assert depth <= MAX_NAME_DEPTH
    # what the tree keeps is bounded per tensor, whatever the names were
    assert _module_chars(ckpt) <= n_tensors * MAX_NAME_DEPTH * MAX_NAME_CHARS
    assert len({t.name for t in ckpt.tensors}) == n_tensors  # cut names stay distinct


def _dotted(i: int, dots: int) -> str:
    return ".".join(["m"] * dots) + f".w{i}"


SPELLINGS = {
    # flat keys with 10,000 dots each
    "dots": lambda: {_dotted(i, 10_000): T for i in range(5)},
    # one 200 KB segment, no dots
    "long": lambda: {"x" * 200_000 + str(i): T for i in range(5)},
    # dots and length both: 60,000 dots of 2-char parts
    "dots and length": lambda: {".".join(["ab"] * 60_000) + str(i): T for i in range(3)},
}


@pytest.mark.parametrize("name", SPELLINGS)
def test_flat_hostile_names_are_capped(tmp_path, name):
    items = SPELLINGS[name]()
    path = torch_zip(tmp_path / "n.pt", state_pickle(items), DATA)
    ckpt = open_checkpoint(path)
    _check(ckpt, len(items))
    assert any("cut" in w or "deeper" in w for w in ckpt.warnings)


def test_nested_dicts_repeating_one_long_key(tmp_path):
    """900 nested dicts, each keyed by the same memoised 100 KB string (3 bytes per level):
    the walker's joined paths would be 900 * 100 KB * 900 / 2 = 40 GB of string."""
    key = "k" * 100_000
    levels = 900
    # d1 K d2 K ... d899 K d900: then d900["w"] = T, and SETITEM closes each level
    body = EMPTY_DICT + uni(key) + BINPUT + b"\x00" + (EMPTY_DICT + BINGET + b"\x00") * (levels - 2) + EMPTY_DICT
    leaf = uni("w") + T + SETITEM
    data = PROTO2 + EMPTY_DICT + uni("model") + body + leaf + SETITEM * levels + STOP
    path = torch_zip(tmp_path / "nest.pt", data, DATA)
    ckpt = open_checkpoint(path, strict=False)
    assert len(ckpt.tensors) <= 1
    for t in ckpt.tensors:
        assert len(t.name) <= MAX_NAME_CHARS and is_cut(t.name)
    for e in ckpt.entries:
        assert len(e.path) <= MAX_NAME_CHARS


def test_full_module_with_long_child_names(tmp_path):
    """nn.Module pickles name their modules by _modules keys: those are capped as they join."""
    mod = b"c__main__\nM\n)\x81"  # NEWOBJ of an unknown class: an Inert module
    key = "c" * 5000
    # module -> {_modules: {key: module -> {_modules: {key: ...}}}} 40 levels, and a parameter
    def module(inner: bytes) -> bytes:
        state = EMPTY_DICT + MARK + uni("_modules") + EMPTY_DICT + uni(key) + inner + SETITEM
        state += uni("_parameters") + EMPTY_DICT + uni("w") + T + SETITEM + SETITEMS
        return mod + state + b"b"

    inner = mod + EMPTY_DICT + b"b"
    for _ in range(40):
        inner = module(inner)
    path = torch_zip(tmp_path / "mod.pt", PROTO2 + inner + STOP, DATA)
    ckpt = open_checkpoint(path, strict=False)
    assert ckpt.tensors and all(len(t.name) <= MAX_NAME_CHARS for t in ckpt.tensors)
    assert all(len(node.name) <= MAX_NAME_CHARS for node in ckpt.tree.walk())
    assert len({t.name for t in ckpt.tensors}) == len(ckpt.tensors)


def test_json_output_is_bounded(tmp_path):
    items = SPELLINGS["dots"]()
    path = torch_zip(tmp_path / "n.pt", state_pickle(items), DATA)
    ckpt = open_checkpoint(path)
    text = "".join(summary_json_chunks(ckpt))
    json.loads(text)
    source = sum(len(k) for k in items)  # 250 KB of names
    assert len(text) < source  # was 500 MB: every implied module with its full name


def test_names_under_the_cap_are_untouched(tmp_path):
    name = ".".join(["layer"] * (MAX_NAME_DEPTH - 1)) + ".weight"
    path = torch_zip(tmp_path / "ok.pt", state_pickle({name: T}), DATA)
    ckpt = open_checkpoint(path)
    assert [t.name for t in ckpt.tensors] == [name] and not ckpt.warnings


# -- flat state dicts -------------------------------------------------------------------------
def _flat(tmp_path: Path, n: int) -> Path:
    # one storage per four tensors, the storage tuple memoised: a compact 100k-tensor pickle
    items = []
    for i in range(n):
        items.append(uni(f"t{i}") + tensor(storage(str(i % 4), 4), 0, (4,), (1,)))
    data = PROTO2 + EMPTY_DICT + MARK + b"".join(items) + SETITEMS + STOP
    return torch_zip(tmp_path / "flat.pt", data, {str(k): bytes(16) for k in range(4)})


@pytest.mark.parametrize("n", [AUTO_MAX_CHILDREN + 1, 20_000])
def test_flat_state_dict_summary_prints_a_bounded_number_of_rows(tmp_path, n):
    ckpt = open_checkpoint(_flat(tmp_path, 20_000 if n > 1000 else 500))
    out = io.StringIO()
    render_summary(ckpt, text_console(file=out, width=120))
    rows = [line for line in out.getvalue().splitlines() if re.match(r"t\d", line)]
    assert len(rows) <= AUTO_MAX_CHILDREN
    assert "more tensors" in out.getvalue()


def test_flat_state_dict_with_a_filter_lists_what_matches(tmp_path):
    ckpt = open_checkpoint(_flat(tmp_path, 500))
    out = io.StringIO()
    render_summary(ckpt, text_console(file=out, width=120), pattern="t1?")
    rows = [line.split()[0] for line in out.getvalue().splitlines() if re.match(r"t\d", line)]
    assert rows == [f"t{i}" for i in range(10, 20)]




def test_implied_tree_is_bounded_as_a_whole(tmp_path):
    """10,000 names of 1,000 characters and 63 dots, all prefixes distinct, one memoised tensor
    (a few MB of file): every implied module would keep its full name, 330 MB of them."""
    from modelscope_tui.checkpoint import MIN_TREE_BUDGET, TREE_NODE_COST

    part = "p" * 14
    names = [f"{i:05d}" + ("." + part) * 63 + ".w" for i in range(10_000)]
    first = uni(names[0]) + T + BINPUT + b"\x01"
    rest = b"".join(uni(n) + BINGET + b"\x01" for n in names[1:])
    path = torch_zip(tmp_path / "tree.pt", PROTO2 + EMPTY_DICT + MARK + first + rest + SETITEMS + STOP, DATA)
    assert path.stat().st_size < 12 << 20
    ckpt = open_checkpoint(path, strict=False)
    nodes = list(ckpt.tree.walk())
    cost = sum(TREE_NODE_COST + len(n.name) for n in nodes[1:])
    assert cost <= max(MIN_TREE_BUDGET, 512 * len(ckpt.tensors))
    assert sum(len(n.tensors) for n in nodes) == len(ckpt.tensors) == 10_000  # none lost
    assert any("module tree implied by names reached its budget" in w for w in ckpt.warnings)
