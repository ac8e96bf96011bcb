"""Find the bytes of a pickle that hold each tensor's requires_grad flag or a storage's
location, without unpickling, and rewrite them.

A symbolic stack machine walks the opcodes (as opcodes.tokens reads them, the same reading as
the pre-scan's) and evaluates just enough to see the torch rebuild calls: their storage key, offset, shape, stride, and where a literal
`True`/`False` argument was pushed. Everything else becomes an opaque value. Nothing is imported
or called.

The machine counts tensor creations exactly like the safe unpickler (`TensorRef.pickle_seq` order), so the
k-th `TensorRebuild` here is the k-th `TensorRef` the reader made from the same pickle; writers
verify that correspondence by signature before touching a byte.

Flags are rewritten in place: NEWTRUE (0x88) <-> NEWFALSE (0x89), or `I01` <-> `I00` in
protocol 0/1 pickles. Both keep the length, so no other offset in the pickle moves.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...errors import MscopeError
from .opcodes import OPCODES, tokens
from .unpickler import TORCH_DTYPES


class PicklePatchError(MscopeError):
    """The pickle cannot be analysed well enough to patch it safely."""


# Calls the safe unpickler turns into a TensorRef (see unpickler.SAFE_FUNCTIONS).
_TENSOR_REBUILD = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_tensor"),
}
_PARAMETER_REBUILD = {
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
}
_FROM_TYPE = ("torch._tensor", "_rebuild_from_type_v2")
_WITHOUT_STORAGE = {
    ("torch._utils", "_rebuild_qtensor"): "quantized",
    ("torch._utils", "_rebuild_sparse_tensor"): "sparse",
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): "meta",
    ("torch._utils", "_rebuild_wrapper_subclass"): "wrapper subclass",
    ("torch._utils", "_rebuild_nested_tensor"): "nested",
    ("torch._utils", "_rebuild_device_tensor_from_numpy"): "numpy",
}
_TORCH_SIZE = ("torch", "Size")
_CALLS = frozenset(
    {*_TENSOR_REBUILD, *_PARAMETER_REBUILD, _FROM_TYPE, *_WITHOUT_STORAGE, _TORCH_SIZE}
)

NEWTRUE, NEWFALSE = 0x88, 0x89


@dataclass(slots=True)
class BoolArg:
    """A literal bool in the stream: `pos` is the offset of the bytes that encode it."""

    value: bool
    pos: int
    text: bool = False  # protocol 0/1 `I01\n` / `I00\n`: pos is the first digit
    shared: bool = False  # read again elsewhere (memo/DUP): rewriting it would change that too

    def encode(self, value: bool) -> bytes:
        if self.text:
            return b"01" if value else b"00"
        return bytes((NEWTRUE if value else NEWFALSE,))

    def current(self) -> bytes:
        return self.encode(self.value)


@dataclass(slots=True)
class TensorRebuild:
    """One tensor creation, in stream order."""

    ordinal: int
    pos: int  # offset of the REDUCE that created it
    storage_key: str | None
    offset: int | None
    shape: tuple | None
    stride: tuple | None
    flag: BoolArg | None = None  # the rebuild's own requires_grad argument, when a literal
    flag_given: bool = False  # the rebuild had a requires_grad argument at all
    parameter_wraps: int = 0  # how many _rebuild_parameter calls took this tensor
    parameter_flag: BoolArg | None = None  # requires_grad argument of that call, when a literal
    parameter_flag_given: bool = False
    note: str | None = None

    @property
    def signature(self) -> tuple:
        return (self.storage_key, self.offset, self.shape, self.stride)

    def controlling_flag(self) -> BoolArg | None:
        """The literal whose value torch will use, if it can be rewritten alone (else None)."""
        if self.parameter_wraps > 1:
            return None
        flag = self.parameter_flag if self.parameter_wraps else self.flag
        return None if flag is None or flag.shared else flag

    def loaded_requires_grad(self) -> bool | None:
        """What torch.load gives this tensor, when the stream says so with literals."""
        if self.parameter_wraps:
            if self.parameter_flag is not None:
                return self.parameter_flag.value
            return None if self.parameter_flag_given else True  # _rebuild_parameter's default
        if self.flag is not None:
            return self.flag.value
        return None if self.flag_given else False


class _Global:
    __slots__ = ("module", "name", "key")

    def __init__(self, module: str, name: str):
        self.module = module
        self.name = name
        self.key = (module, name)


class _Persid:
    __slots__ = ("pid",)

    def __init__(self, pid: Any):
        self.pid = pid


class _Opaque:
    """Any value we do not model (dicts, objects, call results)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<opaque>"


OPAQUE = _Opaque()


class _List(list):
    """A pickled list whose items we keep (shapes can be lists)."""


@dataclass
class ScanResult:
    tensors: list[TensorRebuild] = field(default_factory=list)
    end: int = 0  # offset just past STOP, relative to the pickle start


def scan_tensor_rebuilds(
    data: bytes | bytearray | memoryview, source: str = "pickle"
) -> ScanResult:
    """Walk one pickle (starting at data[0]) and list its tensor rebuilds in creation order."""
    machine = _Machine(source)
    try:
        machine.run(bytes(data))
    except PicklePatchError:
        raise
    except Exception as exc:  # a malformed pickle can make the decoder raise almost anything
        raise PicklePatchError(
            f"{source}: cannot follow the pickle ({type(exc).__name__}: {str(exc)[:100]})"
        ) from exc
    return ScanResult(machine.tensors, machine.end)


class _Machine:
    def __init__(self, source: str):
        self.source = source
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.tensors: list[TensorRebuild] = []
        self.end = 0
        # ids of objects read a second time (memo GET, DUP). Everything that can be fetched
        # again lives in the memo, so these ids stay unique for the whole scan.
        self.reused: set[int] = set()
        self.kept: list[Any] = []
        # (flag, the argument tuples it reached its call through): kept alive for the ids above.
        self.flag_paths: list[tuple[BoolArg, tuple[Any, ...]]] = []

    # -- the loop --------------------------------------------------------------------------------
    def run(self, data: bytes) -> None:
        """Evaluate the opcodes opcodes.tokens reads; the branches are ordered by how often
        torch pickles use each opcode."""
        memo = self.memo
        reused = self.reused
        metastack = self.metastack
        stack = self.stack
        for op, at, arg, nxt in tokens(data):
            if nxt < 0:  # a malformed argument, or not an opcode (opcodes.tokens says which)
                raise PicklePatchError(f"{self.source}: {arg} at byte {at} (opcode 0x{op:02x})")
            if op == 0x68:  # h BINGET
                value = memo[arg]
                reused.add(id(value))
                stack.append(value)
            elif op == 0x72 or op == 0x71:  # r LONG_BINPUT, q BINPUT
                memo[arg] = stack[-1]
            elif op == 0x52:  # R REDUCE
                args = stack.pop()
                func = stack[-1]
                stack[-1] = (
                    self.call(func, args, at)
                    if type(func) is _Global and func.key in _CALLS
                    else OPAQUE
                )
            elif op == 0x29:  # ) EMPTY_TUPLE
                stack.append(())
            elif op == 0x4B:  # K BININT1
                stack.append(arg)
            elif op == 0x28:  # ( MARK
                metastack.append(stack)
                stack = []
            elif op == 0x6A:  # j LONG_BINGET
                value = memo[arg]
                reused.add(id(value))
                stack.append(value)
            elif op == 0x7D or op == 0x8F:  # } EMPTY_DICT, EMPTY_SET
                stack.append(OPAQUE)
            elif op == 0x85:  # TUPLE1
                stack[-1] = (stack[-1],)
            elif op == 0x88:  # NEWTRUE
                stack.append(BoolArg(True, at))
            elif op == 0x74:  # t TUPLE
                value = tuple(stack)
                stack = metastack.pop()
                stack.append(value)
            elif op == 0x58 or op == 0x8C:  # X BINUNICODE, SHORT_BINUNICODE
                stack.append(data[arg:nxt].decode("utf-8", "surrogatepass"))
            elif op == 0x94:  # MEMOIZE
                memo[len(memo)] = stack[-1]
            elif op == 0x86:  # TUPLE2
                stack[-2:] = [(stack[-2], stack[-1])]
            elif op == 0x87:  # TUPLE3
                stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
            elif op == 0x89:  # NEWFALSE
                stack.append(BoolArg(False, at))
            elif op == 0x63:  # c GLOBAL
                module = data[at + 1 : arg].decode("utf-8", "surrogateescape")
                name = data[arg + 1 : nxt - 1].decode("utf-8", "surrogateescape")
                stack.append(_global(module, name))
            elif op == 0x93:  # STACK_GLOBAL
                name = stack.pop()
                stack[-1] = _global(str(stack[-1]), str(name))
            elif op == 0x75 or op == 0x90:  # u SETITEMS, ADDITEMS
                stack = metastack.pop()
            elif op == 0x4E:  # N NONE
                stack.append(None)
            elif op == 0x81:  # NEWOBJ
                del stack[-1]
                stack[-1] = OPAQUE
            elif op == 0x62:  # b BUILD
                del stack[-1]
            elif op == 0x51:  # Q BINPERSID
                stack[-1] = _Persid(stack[-1])
            elif op == 0x4D or op == 0x4A or op == 0x47:  # M BININT2, J BININT, G BINFLOAT
                stack.append(arg)
            elif op == 0x5D:  # ] EMPTY_LIST
                stack.append(_List())
            elif op == 0x61:  # a APPEND
                value = stack.pop()
                if isinstance(stack[-1], _List):
                    stack[-1].append(value)
            elif op == 0x65:  # e APPENDS
                items = stack
                stack = metastack.pop()
                if isinstance(stack[-1], _List):
                    stack[-1].extend(items)
            elif op == 0x73:  # s SETITEM
                del stack[-2:]
            elif op == 0x95 or op == 0x80:  # FRAME, PROTO
                pass
            elif op == 0x2E:  # . STOP
                self.end = nxt
                self.mark_shared()
                return
            elif op == 0x8A or op == 0x8B:  # LONG1, LONG4
                stack.append(int.from_bytes(data[arg:nxt], "little", signed=True))
            elif op in _COUNTED:  # bytes / str with a length prefix
                raw = data[arg:nxt]
                kind = _COUNTED[op]
                if kind == "str":
                    stack.append(raw.decode("utf-8", "surrogateescape"))
                elif kind == "bytes":
                    stack.append(raw)
                else:
                    stack.append(OPAQUE)
            elif op in _TEXT_ARG:  # protocol 0 opcodes whose argument is one line of text
                text = data[arg : nxt - 1]
                if op == 0x49:  # I INT; `I01` / `I00` are protocol 0/1's True / False
                    if text in (b"01", b"00"):
                        stack.append(BoolArg(text == b"01", arg, text=True))
                    else:
                        stack.append(int(text))
                elif op == 0x4C:  # L LONG
                    stack.append(int(text[:-1] if text.endswith(b"L") else text))
                elif op == 0x46:  # F FLOAT
                    stack.append(float(text))
                elif op == 0x53:  # S STRING
                    if len(text) < 2 or text[:1] != text[-1:] or text[:1] not in (b"'", b'"'):
                        raise PicklePatchError(f"{self.source}: malformed STRING at byte {at}")
                    stack.append(
                        codecs.escape_decode(text[1:-1])[0].decode("utf-8", "surrogateescape")
                    )
                elif op == 0x56:  # V UNICODE
                    stack.append(text.decode("raw-unicode-escape"))
                elif op == 0x70:  # p PUT
                    memo[int(text)] = stack[-1]
                elif op == 0x67:  # g GET
                    value = memo[int(text)]
                    reused.add(id(value))
                    stack.append(value)
                else:  # P PERSID
                    stack.append(_Persid(text.decode("ascii", "surrogateescape")))
            elif op == 0x69:  # i INST: pops to the mark
                stack = metastack.pop()
                stack.append(OPAQUE)
            elif op == 0x6F:  # o OBJ
                stack = metastack.pop()
                stack.append(OPAQUE)
            elif op == 0x6C:  # l LIST
                value = _List(stack)
                stack = metastack.pop()
                stack.append(value)
            elif op == 0x64 or op == 0x91:  # d DICT, FROZENSET
                stack = metastack.pop()
                stack.append(OPAQUE)
            elif op == 0x92:  # NEWOBJ_EX
                del stack[-2:]
                stack[-1] = OPAQUE
            elif op == 0x30:  # 0 POP
                if stack:
                    stack.pop()
                else:
                    stack = metastack.pop()
            elif op == 0x31:  # 1 POP_MARK
                stack = metastack.pop()
            elif op == 0x32:  # 2 DUP
                value = stack[-1]
                reused.add(id(value))
                self.kept.append(value)  # keep its id unique for the rest of the scan
                stack.append(value)
            elif op == 0x82 or op == 0x83 or op == 0x84 or op == 0x97:  # EXT1/2/4, NEXT_BUFFER
                stack.append(OPAQUE)
            elif op == 0x98:  # READONLY_BUFFER
                pass
            else:  # pragma: no cover - every opcode has a branch above
                raise PicklePatchError(f"{self.source}: opcode 0x{op:02x} at byte {at} is not modelled")
        raise PicklePatchError(f"{self.source}: pickle is truncated (no STOP)")

    def mark_shared(self) -> None:
        """A flag whose bytes are read by more than one consumer (the bool itself or a tuple
        holding it was fetched from the memo again) must not be rewritten: that would change
        the other reader too."""
        reused = self.reused
        for flag, path in self.flag_paths:
            if id(flag) in reused or any(id(holder) in reused for holder in path):
                flag.shared = True

    # -- calls -----------------------------------------------------------------------------------
    def call(self, func: Any, args: Any, pos: int, path: tuple[Any, ...] = ()) -> Any:
        if not isinstance(func, _Global) or not isinstance(args, tuple):
            return OPAQUE
        key = func.key
        path = (*path, args)
        if key in _TENSOR_REBUILD:
            return self.tensor(args, pos, path, has_flag=key != ("torch._utils", "_rebuild_tensor"))
        if key in _PARAMETER_REBUILD:
            data = args[0] if args else None
            if isinstance(data, TensorRebuild):
                data.parameter_wraps += 1
                data.parameter_flag_given = len(args) >= 2
                data.parameter_flag = self.flag(args[1], path) if len(args) >= 2 else None
                return data
            return OPAQUE
        if key == _FROM_TYPE:
            # _rebuild_from_type_v2(func, new_type, args, state): the reader calls func(*args).
            if len(args) >= 3 and isinstance(args[0], _Global) and isinstance(args[2], tuple):
                inner = args[0].key
                if (
                    inner in _TENSOR_REBUILD
                    or inner in _WITHOUT_STORAGE
                    or inner in _PARAMETER_REBUILD
                ):
                    return self.call(args[0], args[2], pos, path)
            return OPAQUE
        kind = _WITHOUT_STORAGE.get(key)
        if kind is not None:
            if kind == "meta" and len(args) >= 3 and _is_dtype(args[0]):
                ref = self.new_tensor(pos, None, 0, args[1], args[2])
            elif args and isinstance(args[0], _Persid) and len(args) >= 4:
                ref = self.new_tensor(pos, _storage_key(args[0]), args[1], args[2], args[3])
            else:
                return OPAQUE
            ref.note = kind
            return ref
        if key == _TORCH_SIZE and len(args) == 1 and isinstance(args[0], (tuple, list)):
            return tuple(args[0])
        return OPAQUE

    def tensor(self, args: tuple, pos: int, path: tuple[Any, ...], has_flag: bool) -> Any:
        if len(args) < 4:
            return OPAQUE
        ref = self.new_tensor(pos, _storage_key(args[0]), args[1], args[2], args[3])
        if has_flag and len(args) >= 5:
            ref.flag_given = True
            ref.flag = self.flag(args[4], path)
        return ref

    def flag(self, value: Any, path: tuple[Any, ...]) -> BoolArg | None:
        if not isinstance(value, BoolArg):
            return None
        self.flag_paths.append((value, path))
        return value

    def new_tensor(
        self, pos: int, key: str | None, offset: Any, shape: Any, stride: Any
    ) -> TensorRebuild:
        ref = TensorRebuild(
            ordinal=len(self.tensors),
            pos=pos,
            storage_key=key,
            offset=offset if type(offset) is int else None,
            shape=_dims(shape),
            stride=_dims(stride),
        )
        if stride is None and ref.shape is not None:  # the reader makes these contiguous
            ref.stride = contiguous_stride(ref.shape)
        self.tensors.append(ref)
        return ref


_U32 = struct.Struct("<I")
# Length-prefixed arguments other than the common str and the ints: what the payload becomes.
_COUNTED = {
    0x54: "str",  # T BINSTRING (Python 2 str; read as text like the safe unpickler)
    0x55: "str",  # U SHORT_BINSTRING
    0x42: "bytes",  # B BINBYTES
    0x43: "bytes",  # C SHORT_BINBYTES
    0x8E: "bytes",  # BINBYTES8
    0x8D: "str",  # BINUNICODE8
    0x96: "opaque",  # BYTEARRAY8
}
# INT, LONG, FLOAT, STRING, UNICODE, PUT, GET, PERSID
_TEXT_ARG = frozenset(b"ILFSVpgP")


def _global(module: str, name: str) -> _Global:
    # Same Python 2 name mapping as the safe unpickler's find_class.
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return _Global(module, name)


def _is_dtype(value: Any) -> bool:
    return isinstance(value, _Global) and value.module == "torch" and value.name in TORCH_DTYPES


def _storage_key(value: Any) -> str | None:
    if isinstance(value, _Persid):
        pid = value.pid
        if (
            isinstance(pid, tuple)
            and len(pid) >= 3
            and pid[0] == "storage"
            and isinstance(pid[2], str)
        ):
            return pid[2]
    return None


def _dims(value: Any) -> tuple | None:
    if isinstance(value, (tuple, list)) and all(type(v) is int for v in value):
        return tuple(value)
    return None


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


# ----------------------------------------------------------------------------------------------
# Storage locations: the 4th element of each ('storage', type, key, location, numel) persistent id
# ----------------------------------------------------------------------------------------------
# A second, smaller symbolic machine. It models only what a persistent id is made of (strings,
# tuples, the memo) and remembers, for every string on the stack, the opcode that put it there
# (its literal push, or the GET/DUP that fetched it again). Every other value is opaque; the
# stack effect of the opcodes it does not model comes from opcodes.OPCODES.


@dataclass(eq=False, slots=True)
class StrObject:
    """One string object of the unpickled graph: the opcode that created it."""

    value: str
    op: int  # the opcode byte (SHORT_BINUNICODE, BINUNICODE, STRING, ...)
    start: int  # offset of that opcode
    end: int  # offset just past it
    uses: list[StrUse] = field(default_factory=list)  # every stack copy made of it


@dataclass(eq=False, slots=True)
class StrUse:
    """One stack copy of a string: where it came from (`push`, `get` or `dup`)."""

    obj: StrObject
    start: int
    end: int
    how: str


@dataclass(slots=True)
class LocationRef:
    """One storage persistent id, in stream order."""

    key: str | None
    value: str | None  # None: the location is not a literal string
    use: StrUse | None
    pos: int  # offset of the BINPERSID


@dataclass
class LocationScan:
    locations: list[LocationRef] = field(default_factory=list)
    # FRAME opcodes: (offset of the 8-byte length, first byte of the frame, end of the frame)
    frames: list[tuple[int, int, int]] = field(default_factory=list)
    end: int = 0


_STR_OPS = frozenset(b"\x8cX\x8dUTVS")
_MEMO_PUT_OPS = frozenset(b"qrp\x94")


def scan_storage_locations(
    data: bytes | bytearray | memoryview, source: str = "pickle"
) -> LocationScan:
    """Every storage persistent id of one pickle (starting at data[0]) and where its location
    string comes from. Nothing is imported or called."""
    try:
        return _scan_locations(bytes(data), source)
    except PicklePatchError:
        raise
    except Exception as exc:  # a malformed pickle can make the decoder raise almost anything
        raise PicklePatchError(
            f"{source}: cannot follow the pickle ({type(exc).__name__}: {str(exc)[:100]})"
        ) from exc


def _scan_locations(data: bytes, source: str) -> LocationScan:
    result = LocationScan()
    stack: list[Any] = []
    metastack: list[list[Any]] = []
    memo: dict[int, Any] = {}
    for op, at, arg, pos in tokens(data):
        if pos < 0:  # a malformed argument, or not an opcode (opcodes.tokens says which)
            raise PicklePatchError(f"{source}: {arg} at byte {at} (opcode 0x{op:02x})")
        if op in _STR_OPS:
            if op == 0x56 or op == 0x53:  # UNICODE, STRING: one line of text
                raw = data[arg : pos - 1]
                if op == 0x56:
                    value = raw.decode("raw-unicode-escape")
                else:
                    if len(raw) < 2 or raw[:1] != raw[-1:] or raw[:1] not in (b"'", b'"'):
                        raise PicklePatchError(f"{source}: malformed STRING at byte {at}")
                    value = codecs.escape_decode(raw[1:-1])[0].decode("utf-8", "surrogateescape")
            else:
                value = data[arg:pos].decode("utf-8", "surrogateescape")
            obj = StrObject(value, op, at, pos)
            use = StrUse(obj, at, pos, "push")
            obj.uses.append(use)
            stack.append(use)
        elif op == 0x68 or op == 0x6A or op == 0x67:  # BINGET, LONG_BINGET, GET
            value = memo[int(data[arg : pos - 1]) if op == 0x67 else arg]
            if type(value) is StrUse:
                value = StrUse(value.obj, at, pos, "get")
                value.obj.uses.append(value)
            stack.append(value)
        elif op in _MEMO_PUT_OPS:
            if op == 0x70:  # PUT
                index = int(data[arg : pos - 1])
            elif op == 0x94:  # MEMOIZE
                index = len(memo)
            else:  # BINPUT, LONG_BINPUT
                index = arg
            memo[index] = stack[-1]
        elif op == 0x28:  # MARK
            metastack.append(stack)
            stack = []
        elif op == 0x74:  # TUPLE
            value = tuple(stack)
            stack = metastack.pop()
            stack.append(value)
        elif op == 0x29:  # EMPTY_TUPLE
            stack.append(())
        elif op == 0x85:  # TUPLE1
            stack[-1] = (stack[-1],)
        elif op == 0x86:  # TUPLE2
            stack[-2:] = [(stack[-2], stack[-1])]
        elif op == 0x87:  # TUPLE3
            stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
        elif op == 0x51:  # BINPERSID
            pid = stack[-1]
            if (
                type(pid) is tuple
                and len(pid) in (5, 6)
                and type(pid[0]) is StrUse
                and pid[0].obj.value == "storage"
            ):
                key = pid[2].obj.value if type(pid[2]) is StrUse else None
                loc = pid[3]
                if type(loc) is StrUse:
                    result.locations.append(LocationRef(key, loc.obj.value, loc, at))
                else:
                    result.locations.append(LocationRef(key, None, None, at))
            stack[-1] = OPAQUE
        elif op == 0x32:  # DUP
            value = stack[-1]
            if type(value) is StrUse:
                value = StrUse(value.obj, at, pos, "dup")
                value.obj.uses.append(value)
            stack.append(value)
        elif op == 0x30:  # POP
            if stack:
                stack.pop()
            else:
                stack = metastack.pop()
        elif op == 0x2E:  # STOP
            result.end = pos
            return result
        elif op == 0x95:  # FRAME: (offset of the 8-byte length, first byte of the frame, its end)
            result.frames.append((at + 1, pos, pos + arg))
        else:  # modelled by its stack effect alone (opcodes.OPCODES)
            effect = OPCODES[op]
            if effect.to_mark:
                stack = metastack.pop()
            popped = effect.pops
            if popped:
                if popped > len(stack):
                    raise PicklePatchError(f"{source}: stack underflow at byte {at}")
                del stack[-popped:]
            stack.extend([OPAQUE] * effect.pushes)
    raise PicklePatchError(f"{source}: pickle is truncated (no STOP)")


def _encode_str(op: int, value: str) -> bytes:
    """`value` pushed by the same kind of opcode as `op` (device names are plain ASCII)."""
    raw = value.encode("ascii")
    if op == 0x8C or op == 0x55:
        return bytes((op, len(raw))) + raw
    if op == 0x58 or op == 0x54:
        return bytes((op,)) + _U32.pack(len(raw)) + raw
    if op == 0x8D:
        return b"\x8d" + len(raw).to_bytes(8, "little") + raw
    if op == 0x56:
        return b"V" + raw + b"\n"
    return b"S'" + raw + b"'\n"


def rewrite_storage_locations(
    data: bytes | bytearray | memoryview,
    remap: Callable[[str], str | None],
    source: str = "pickle",
) -> tuple[bytes, list[tuple[str | None, str, str]]]:
    """A copy of one pickle (data[0] to its STOP) whose storage persistent ids carry new locations.

    `remap(location)` gives the new location, or None to keep it. New values must be plain ASCII
    device names. Returns (new pickle, [(storage key, old, new)] for each changed persistent id).

    Only what reaches the persistent ids changes. A location string that nothing else reads
    (the usual case, also when later ids fetch it from the memo) is rewritten where it is first
    pushed, as torch would have written it. When the very same memoized string object is also
    read elsewhere (a config value that is that object), the two sides are separated: the push
    keeps the value of the side it feeds, and the other side's memo fetches become literals of
    their own (the value is the same; only the object identity splits). A persistent id tuple
    that is itself fetched again and read by something other than BINPERSID changes for that
    reader too. FRAME lengths are adjusted. Only opcodes torch's weights_only unpickler accepts
    are written.
    """
    data = bytes(data)
    scan = scan_storage_locations(data, source)
    body = data[: scan.end]
    changed: list[tuple[str | None, str, str]] = []
    pid_uses: dict[int, StrUse] = {}
    for ref in scan.locations:
        if ref.use is None:
            raise PicklePatchError(
                f"{source}: storage {ref.key!r} names its location with something other than a string"
            )
        new = remap(ref.value)  # type: ignore[arg-type]
        if new is None or new == ref.value:
            continue
        _check_location_text(new, source)
        changed.append((ref.key, ref.value, new))  # type: ignore[arg-type]
        pid_uses[id(ref.use)] = ref.use
    by_obj: dict[int, tuple[StrObject, list[StrUse]]] = {}
    for use in pid_uses.values():
        by_obj.setdefault(id(use.obj), (use.obj, []))[1].append(use)
    edits: list[tuple[int, int, bytes]] = []
    for obj, uses in by_obj.values():
        new = _encode_str(obj.op, remap(obj.value))  # type: ignore[arg-type]
        if len(uses) == len(obj.uses):
            edits.append((obj.start, obj.end, new))
            continue
        # The string object is read elsewhere too. Give each side its own literal, using only
        # opcodes torch's weights_only unpickler accepts: the push keeps the value of whichever
        # side it feeds, and the other side's GETs become literals.
        mine = {id(u) for u in uses}
        first_is_pid = id(obj.uses[0]) in mine
        if first_is_pid:
            edits.append((obj.start, obj.end, new))
            moved, literal = [u for u in obj.uses if id(u) not in mine], data[obj.start : obj.end]
        else:
            moved, literal = uses, new
        for use in moved:
            if use.how != "get":
                raise PicklePatchError(
                    f"{source}: the location {obj.value!r} is shared in a way that cannot be "
                    "rewritten for the storages alone"
                )
            edits.append((use.start, use.end, literal))
    edits.sort(key=lambda e: (e[0], e[1]))
    for (_, e0, _), (s1, _, _) in zip(edits, edits[1:]):
        if s1 < e0:
            raise PicklePatchError(f"{source}: overlapping location edits at byte {s1}")
    out = bytearray()
    pos = 0
    for start, end, new_bytes in edits:
        out += body[pos:start]
        out += new_bytes
        pos = end
    out += body[pos:]
    for length_at, first, last in scan.frames:
        delta = 0
        for start, end, new_bytes in edits:
            inside = first <= start and end <= last if start < end else first < start <= last
            if inside:
                delta += len(new_bytes) - (end - start)
        if delta:
            new_at = _shifted(length_at, edits)
            out[new_at : new_at + 8] = (last - first + delta).to_bytes(8, "little")
    result = bytes(out)
    _check_rewrite(scan, result, remap, source)
    return result, changed


def _shifted(offset: int, edits: list[tuple[int, int, bytes]]) -> int:
    """Where a byte at `offset` (outside every edit) lands after the edits."""
    return offset + sum(len(new) - (end - start) for start, end, new in edits if end <= offset)


def _check_location_text(value: str, source: str) -> None:
    if not (
        0 < len(value) <= 64 and value.isascii() and all(c.isalnum() or c in "_:.-" for c in value)
    ):
        raise PicklePatchError(f"{source}: {value[:70]!r} is not a device name")


def _check_rewrite(
    before: LocationScan, data: bytes, remap: Callable[[str], str | None], source: str
) -> None:
    """The rewritten pickle names the same storages, in order, with the new locations."""
    after = scan_storage_locations(data, source)
    expected = [(r.key, remap(r.value) or r.value) for r in before.locations]  # type: ignore[arg-type]
    found = [(r.key, r.value) for r in after.locations]
    if found != expected or after.end != len(data):
        raise PicklePatchError(f"{source}: rewriting the storage locations went wrong")
