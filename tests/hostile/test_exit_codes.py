"""Process rule (issue #12): no input ends in a signal or an exit code other than 0/1/2.

Every hostile case built in test_records_lie.py and test_budgets.py runs through `summary`,
`audit --stats` and `diff` against a benign file, each in its own process under an address
space limit (so a runaway allocation fails instead of swapping). A SIGSEGV shows up as a
negative return code; a traceback as exit 3 with "Traceback" on stderr.
"""

from __future__ import annotations

import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from craft import BUILD, build_state, state_pickle, storage, tensor, torch_zip  # noqa: E402
from test_budgets import DEEP, _stride0_views  # noqa: E402

SRC = HERE.parent.parent / "src"
DATA = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
MEMORY = 2 << 30  # RLIMIT_AS: torch and numpy map far more than they touch; 2 GiB is generous


def _cases(d: Path) -> dict[str, Path]:
    def one(name: str, value: bytes, storages=None) -> Path:
        return torch_zip(d / f"{name}.pt", state_pickle({"w": value}), {"0": DATA} if storages is None else storages)

    cases = {}
    for spelling in ("dict", "slots", "tuple2"):
        for where, attrs in (
            ("tensor", {"storage_offset": -2, "stride": 1 << 42}),
            ("storage", {"file": "/etc/passwd", "data_offset": -64}),
            ("class", {"storage_offset": 3}),
        ):
            change = build_state(attrs, spelling) + BUILD
            if where == "tensor":
                value = tensor(storage("0", 4), 0, (4,), (1,), after=change)
            elif where == "storage":
                value = tensor(storage("0", 4, after=change), 0, (4,), (1,))
            else:
                value = tensor(storage("0", 4), 0, (4,), (1,), on_class=change)
            cases[f"build-{where}-{spelling}"] = one(f"build-{where}-{spelling}", value)
    cases["stride-2**42"] = one("stride", tensor(storage("0", 4), 0, (4,), (1 << 42,)))
    cases["stride-2d"] = one("stride2d", tensor(storage("0", 4), 0, (2, 2), (1 << 40, 1)))
    cases["offset-2**40"] = one("offset", tensor(storage("0", 4), 1 << 40, (1,), (1,)))
    cases["short-storage"] = one("short", tensor(storage("0", 1 << 16), 0, (1 << 16,), (1,)))
    cases["missing-storage"] = one("missing", tensor(storage("9", 4), 0, (4,), (1,)))
    for name, data in DEEP.items():
        cases[f"deep-{name}"] = torch_zip(d / f"deep-{name.replace(' ', '-')}.pt", data, {})
    sub = d / "views"
    sub.mkdir()
    cases["views-120"] = _stride0_views(sub, 120)
    cases.update(_size_cases(d))
    return cases


def _size_cases(d: Path) -> dict[str, Path]:
    """Deflated members, colliding keys and hostile names (test_inflate, test_hash_flood,
    test_names): a few spellings of each, through every command."""
    from test_hash_flood import SPELLINGS as FLOODS
    from test_inflate import OVER_BUDGET, _torch, _torchscript
    from test_names import SPELLINGS as NAMES

    cases = {}
    for name in ("honest size", "declares 1 KB", "zip64 declares 1 TB"):
        pkl, opts = OVER_BUDGET[name]
        cases[f"deflate-{name}"] = _torch(d / f"deflate-{name.replace(' ', '-')}.pt", pkl, opts)
    code = [(f"m/code/__torch__/f{i}.py", b"#" * (6 << 20), {"method": 8}) for i in range(40)]
    cases["deflate-code"] = _torchscript(d / "deflate-code.pt", code)
    for name in ("setitems ints", "tuple2 of ints", "memo gets", "frozenset members"):
        cases[f"flood-{name}"] = torch_zip(d / f"flood-{name.replace(' ', '-')}.pt", FLOODS[name], {})
    for name in ("dots", "dots and length"):
        cases[f"names-{name}"] = torch_zip(
            d / f"names-{name.replace(' ', '-')}.pt", state_pickle(NAMES[name]()), {"0": bytes(16)}
        )
    return cases


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "modelscope_tui", *args],
        capture_output=True, text=True, env=env, preexec_fn=_limit, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("exit")
    benign = torch_zip(d / "benign.pt", state_pickle({"w": tensor(storage("0", 4), 0, (4,), (1,))}), {"0": DATA})
    return benign, _cases(d)


def test_every_hostile_case_exits_0_1_or_2(corpus):
    benign, cases = corpus
    bad = []
    for name, path in cases.items():
        for args in (("summary", str(path)), ("audit", "--stats", str(path)), ("diff", str(path), str(benign))):
            r = _run(*args)
            if r.returncode not in (0, 1, 2) or "Traceback" in r.stderr:
                bad.append(f"{name} {args[0]}: rc={r.returncode} {r.stderr.strip()[-300:]}")
            # statistics come from the archive's own 16 bytes, never from another file
            if args[0] == "audit" and "passwd" in name and r.returncode in (0, 1):
                assert "root" not in r.stdout
    assert not bad, "\n".join(bad)


def test_crc_of_deflated_members_exits_0_1_or_2(corpus):
    """audit --crc inflates every deflated member: streamed, under the same address-space limit."""
    _, cases = corpus
    for name, path in cases.items():
        if name.startswith("deflate-"):
            r = _run("audit", "--crc", str(path))
            assert r.returncode in (0, 1, 2) and "Traceback" not in r.stderr, (name, r.stderr[-300:])


def test_refused_build_fails_the_dangerous_gate(corpus):
    _, cases = corpus
    r = _run("audit", "--fail-on", "dangerous", str(cases["build-storage-slots"]))
    assert r.returncode == 1, r.stdout[-500:]
    assert "__setstate__" in r.stdout
