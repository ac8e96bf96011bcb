"""`mscope convert` of a pickle that names dangerous globals: refused unless --force, and never run."""

from __future__ import annotations

import struct

from craft import glob, state_pickle, storage, tensor, torch_zip


def dangerous_state_dict(path):
    """{"w": a 4-float tensor, "hook": os.system} (the global named, never called)."""
    pkl = state_pickle({"w": tensor(storage("0", 4), 0, (4,), (1,)), "hook": glob("os", "system")})
    return torch_zip(path, pkl, {"0": struct.pack("<4f", 1, 2, 3, 4)})


def test_dangerous_globals_refused_then_forced(cli, tmp_path):
    src = dangerous_state_dict(tmp_path / "evil.pt")
    out = tmp_path / "out.safetensors"
    r = cli("convert", src, out)
    assert r.rc == 2, r.output
    assert "dangerous globals (os.system)" in r.stderr and "--force" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not out.exists()
    r = cli("convert", src, out, "--force", "--verify")
    assert r.rc == 0, r.output
    from safetensors.torch import load_file

    assert load_file(out)["w"].tolist() == [1, 2, 3, 4]
