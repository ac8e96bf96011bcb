"""`mscope diff A B` in a real terminal (tmux) opens the explorer in diff mode; piped, it prints."""

from __future__ import annotations

from conftest import run_cli
from diffpair import write_pair
from test_e2e_terminal import MSCOPE, Terminal, pytestmark  # noqa: F401 - same skip rule


def test_diff_in_a_terminal_is_the_explorer_and_piped_is_text(tmp_path):
    write_pair(tmp_path)
    term = Terminal([str(MSCOPE), "diff", "before.pt", "after.safetensors"], tmp_path)
    try:
        screen = term.wait_for("→ renamed")  # renames are found once the values are compared
        assert "Δ vs before.pt: 6 changed · 1 close · 1 shape · 1 dtype · 2 added" in screen
        assert "+ added" in screen and "- removed" in screen and "= same" in screen
        term.keys("n")  # the first change: adapter.lora_A, added
        term.wait_for("lora_A")
        term.keys("q")
        term.wait_for("EXITED:0")
    finally:
        term.close()
    res = run_cli("diff", tmp_path / "before.pt", tmp_path / "after.safetensors")
    assert res.rc == 0 and "19 common tensors: 10 identical, 1 close, 6 changed" in res.stdout
