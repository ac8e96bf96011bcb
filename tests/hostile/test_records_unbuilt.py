"""Records built without validation: NEWOBJ calls only `cls.__new__(cls, *args)`, so a class
handed out by the unpickler (torch._utils._rebuild_tensor_v2 is our TensorRef) must validate in
__new__. Found by the grammar fuzzer (bench/fuzz_long.py): NEWOBJ with no arguments made a
TensorRef with no storage, and the walker died with AttributeError."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from craft import (  # noqa: E402
    EMPTY_TUPLE,
    MARK,
    NONE,
    PROTO2,
    STOP,
    TUPLE,
    glob,
    integer,
    ints,
    state_pickle,
    storage,
    torch_zip,
)

from modelscope_tui.errors import MscopeError  # noqa: E402
from modelscope_tui.readers import open_checkpoint  # noqa: E402

NEWOBJ, NEWOBJ_EX, TUPLE1, EMPTY_DICT, REDUCE = b"\x81", b"\x92", b"\x85", b"}", b"R"
REBUILD = glob("torch._utils", "_rebuild_tensor_v2")
RECON = glob("copyreg", "_reconstructor")
OBJECT = glob("builtins", "object")

VALUES = {
    "newobj-no-args": REBUILD + EMPTY_TUPLE + NEWOBJ,
    "newobj-bogus-args": REBUILD + MARK + NONE + integer(-4) + ints((2,)) + ints((1 << 42,)) + TUPLE + NEWOBJ,
    "newobj-ex": REBUILD + EMPTY_TUPLE + EMPTY_DICT + NEWOBJ_EX,
    "newobj-storage-args": REBUILD + MARK + storage("0", 4) + integer(0) + ints((4,)) + ints((1,)) + TUPLE + NEWOBJ,
    "reconstructor-object": RECON + MARK + REBUILD + OBJECT + NONE + TUPLE + REDUCE,
    "size-newobj": glob("torch", "Size") + MARK + b"N" + TUPLE + NEWOBJ,
}


@pytest.mark.parametrize("name", VALUES)
@pytest.mark.parametrize("container", ["zip", "plain"])
def test_a_record_is_never_built_without_validation(tmp_path, name, container):
    if container == "zip":
        path = torch_zip(tmp_path / "t.pt", state_pickle({"w": VALUES[name]}), {"0": bytes(16)})
    else:
        if b"Q" in VALUES[name]:  # persistent ids need a torch zip
            pytest.skip("needs storages")
        path = tmp_path / "t.pkl"
        path.write_bytes(PROTO2 + VALUES[name] + TUPLE1 + STOP)
    try:
        ckpt = open_checkpoint(path, strict=False)
    except MscopeError:
        return  # refused in one line: fine
    for record in ckpt.tensors:  # what opened is a validated record
        assert record.storage is not None or record.note
        assert all(type(v) is int and v >= 0 for v in (*record.shape, *record.stride, record.storage_offset))
