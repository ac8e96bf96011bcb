"""Grammar-based hostile pickles: opcode sequences built against a model of the unpickler's stack.

Mutating torch-made files (mutate.py) rarely reaches the shapes attacks use: BUILD on a record
after it was validated, SETITEM on a module global, a nest 10,000 deep, a global fetched back
from the memo before it is called, a payload followed by garbage. This generator writes those
shapes on purpose, mixed with ordinary tensor records, so the long fuzzer (bench/fuzz_long.py
--grammar) covers them at random. Every case is a plain pickle or a torch zip around one.

The stack model keeps most programs well formed (an opcode is chosen only when its operands are
there), so the unpickler gets deep into each one; a final step may still cut or corrupt it.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

from craft import (
    BINPERSID,
    BUILD,
    EMPTY_DICT,
    EMPTY_LIST,
    EMPTY_TUPLE,
    MARK,
    NEWFALSE,
    NONE,
    REDUCE,
    SETITEM,
    STOP,
    TUPLE,
    TUPLE1,
    TUPLE2,
    glob,
    integer,
    ints,
    torch_zip,
    uni,
)  # fmt: skip

APPEND, APPENDS, SETITEMS, DICT, LIST, POP, DUP = b"a", b"e", b"u", b"d", b"l", b"0", b"2"
EMPTY_SET, ADDITEMS, FROZENSET, MEMOIZE, STACK_GLOBAL = b"\x8f", b"\x90", b"\x91", b"\x94", b"\x93"
NEWOBJ, BINGET, LONG_BINGET, BINPUT, BINFLOAT, BINBYTES = b"\x81", b"h", b"j", b"q", b"G", b"B"

# (module, name): what a pickle names, from the rebuild functions we allow to the gadgets
# published advisories used, and names nothing defines.
GLOBALS = [
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_tensor"),
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("builtins", "set"),
    ("builtins", "getattr"),
    ("builtins", "eval"),
    ("builtins", "dict"),
    ("torch", "FloatStorage"),
    ("torch", "Size"),
    ("torch", "_utils"),
    ("torch.nn.modules.linear", "Linear"),
    ("torch.nn.modules.module", "_global_forward_hooks"),
    ("os", "system"),
    ("posix", "system"),
    ("subprocess", "Popen"),
    ("pkgutil", "resolve_name"),
    ("importlib", "import_module"),
    ("functools", "partial"),
    ("operator", "attrgetter"),
    ("copyreg", "_reconstructor"),
    ("uuid", "_get_command_stdout"),
    ("logging", "FileHandler"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("nonexistent.module", "Thing"),
]
STRINGS = ["", "x", "storage", "cpu", "0", "__dict__", "_rebuild_tensor_v2", "os:system", "weight",
           "a.b.c", "\x1b]52;c;aGk=\x07", "\u202e", "echo mscope-fuzz"]  # fmt: skip


class Program:
    """One pickle being written, with the stack depth it would have at each point."""

    def __init__(self, rng: random.Random, tensors: bool = True):
        self.rng = rng
        self.tensors = tensors  # persistent ids only where a loader resolves them (torch zips)
        self.out = bytearray(b"\x80" + bytes([rng.choice([2, 2, 3, 4])]))
        self.stack: list[str] = []  # "m" for a MARK, "o" for an object, "g" for a global
        self.memo = 0  # entries stored so far (MEMOIZE / BINPUT indexes)

    def emit(self, code: bytes, pops: int = 0, push: str | None = "o") -> None:
        self.out += code
        for _ in range(pops):
            self.stack.pop()
        if push:
            self.stack.append(push)

    def objects_on_top(self) -> int:
        """Objects above the last MARK (or the whole stack without one)."""
        n = 0
        for item in reversed(self.stack):
            if item == "m":
                break
            n += 1
        return n

    def to_mark(self, code: bytes, push: bool = True) -> None:
        while self.stack and self.stack.pop() != "m":
            pass
        self.out += code
        if push:
            self.stack.append("o")

    # -- leaves ------------------------------------------------------------------------------
    def scalar(self) -> None:
        r = self.rng.random()
        if r < 0.3:
            self.emit(integer(self.rng.choice([0, 1, 255, 256, -1, 2**31, 2**63, -(2**70)])))
        elif r < 0.6:
            self.emit(uni(self.rng.choice(STRINGS)))
        elif r < 0.7:
            self.emit(BINFLOAT + struct.pack(">d", self.rng.choice([0.0, -0.0, 1e308, float("nan")])))
        elif r < 0.8:
            self.emit(BINBYTES + struct.pack("<I", 3) + b"abc")
        else:
            self.emit(self.rng.choice([NONE, NEWFALSE, b"\x88"]))

    def a_global(self) -> None:
        module, name = self.rng.choice(GLOBALS)
        if self.rng.random() < 0.3 and self.out[1] >= 4:  # STACK_GLOBAL, dotted names too
            dotted = self.rng.random() < 0.3
            self.emit(uni(module.split(".")[0] if dotted else module))
            self.emit(uni(f"{module.split('.', 1)[1]}.{name}" if dotted and "." in module else name))
            self.emit(STACK_GLOBAL, pops=2, push="g")
        else:
            self.emit(glob(module, name), push="g")

    def tensor(self) -> None:
        """A _rebuild_tensor_v2 record whose numbers are sometimes hostile."""
        numel = self.rng.choice([0, 1, 4, 16, 2**40])
        shape = self.rng.choice([(4,), (2, 2), (0,), (1 << 30,), (2, 3)])
        stride = self.rng.choice([(1,), (2, 1), (0,), (-1,), (1 << 42,), (0, 0)])[: len(shape)]
        offset = self.rng.choice([0, 0, 1, -4, 1 << 40])
        key = self.rng.choice(["0", "1", "../../etc/passwd", "0"])
        pid = MARK + uni("storage") + glob("torch", "FloatStorage") + uni(key) + uni("cpu") + integer(numel) + TUPLE
        body = (
            glob("torch._utils", "_rebuild_tensor_v2") + MARK + pid + BINPERSID + integer(offset)
            + ints(shape) + ints(stride) + NEWFALSE + glob("collections", "OrderedDict")
            + EMPTY_TUPLE + REDUCE + TUPLE + REDUCE
        )  # fmt: skip
        self.emit(body)

    # -- one step ----------------------------------------------------------------------------
    def step(self) -> None:
        rng = self.rng
        top = self.objects_on_top()
        choice = rng.random()
        if choice < 0.18 or top == 0:
            leaves = [self.scalar, self.scalar, self.a_global] + [self.tensor] * (2 if self.tensors else 0)
            rng.choice(leaves)()
        elif choice < 0.26:
            self.emit(rng.choice([EMPTY_LIST, EMPTY_DICT, EMPTY_TUPLE, EMPTY_SET]))
        elif choice < 0.32:
            self.emit(MARK, push="m")
        elif choice < 0.40 and "m" in self.stack:
            self.to_mark(rng.choice([TUPLE, LIST, DICT, FROZENSET]))
        elif choice < 0.46 and "m" in self.stack and len(self.stack) > self.stack[::-1].index("m") + 1:
            self.to_mark(rng.choice([APPENDS, SETITEMS, ADDITEMS]), push=False)
        elif choice < 0.52 and top >= 2:
            self.emit(rng.choice([APPEND, BUILD, TUPLE2, REDUCE, NEWOBJ]), pops=2)
        elif choice < 0.56 and top >= 3:
            self.emit(SETITEM, pops=3)
            self.stack.append("o")  # SETITEM leaves the dict
        elif choice < 0.64 and top >= 1:
            if rng.random() < 0.5:
                self.emit(MEMOIZE, push=None)
            else:
                self.emit(BINPUT + bytes([self.memo % 256]), push=None)
            self.memo += 1
        elif choice < 0.70 and self.memo:
            index = rng.randrange(self.memo + 1)  # sometimes one past the end
            self.emit(BINGET + bytes([index]) if index < 256 else LONG_BINGET + struct.pack("<I", index))
        elif choice < 0.74 and top >= 1:
            if rng.random() < 0.5:
                self.emit(DUP)
            else:
                self.emit(TUPLE1, pops=1)
        elif choice < 0.78 and top >= 1:
            self.emit(POP, pops=1, push=None)
        elif choice < 0.79 and top >= 1:
            deep = rng.random() < 0.2
            self.emit(TUPLE1 * (rng.choice([1001, 5000]) if deep else rng.choice([2, 10, 998])), pops=1)
        elif choice < 0.83:
            self.tampering()
        else:
            self.call()

    def call(self) -> None:
        """global(args) by REDUCE, sometimes fetched back from the memo first."""
        self.a_global()
        if self.rng.random() < 0.3:
            self.emit(MEMOIZE, push=None)
            self.memo += 1
            self.emit(POP, pops=1, push=None)
            index = self.memo - 1
            self.emit(BINGET + bytes([index]) if index < 256 else LONG_BINGET + struct.pack("<I", index))
        self.emit(MARK, push="m")
        for _ in range(self.rng.randrange(3)):
            self.scalar()
        self.to_mark(TUPLE)
        self.emit(REDUCE, pops=2)

    def tampering(self) -> None:
        """BUILD or SETITEM aimed at a module or an allowlisted function."""
        self.emit(glob(*self.rng.choice([("torch", "_utils"), ("torch._utils", "_rebuild_parameter"),
                                         ("torch.nn.modules.module", "_global_forward_hooks")])), push="g")  # fmt: skip
        if self.rng.random() < 0.5:
            self.emit(EMPTY_DICT + uni("_rebuild_tensor_v2") + glob("posix", "system") + SETITEM + BUILD)
        else:
            self.emit(uni("x") + glob("os", "system") + SETITEM)

    def finish(self) -> bytes:
        """Close the program: one object left, then STOP; sometimes cut or corrupted."""
        while self.stack and self.stack[-1] == "m":
            self.stack.pop()
            self.out += NONE + TUPLE  # close the mark
        if not self.stack:
            self.out += NONE
        data = bytes(self.out) + STOP
        r = self.rng.random()
        if r < 0.1:
            data = data[: self.rng.randrange(2, len(data))]  # truncated
        elif r < 0.15:
            data = data[:-1] + b"\xff" + data[-1:]  # an invalid opcode before STOP
        elif r < 0.2:
            data += b"\x00" * self.rng.randrange(1, 64)  # junk after STOP
        return data


def random_pickle(rng: random.Random, steps: int | None = None, tensors: bool = True) -> bytes:
    program = Program(rng, tensors)
    for _ in range(steps if steps is not None else rng.randrange(1, 80)):
        program.step()
    return program.finish()


def random_case(seed: int, directory: Path) -> Path:
    """The case for one seed: a plain pickle file or a torch zip around the generated pickle."""
    rng = random.Random(seed)
    plain = rng.random() < 0.4
    data = random_pickle(rng, tensors=not plain)
    directory.mkdir(parents=True, exist_ok=True)
    if plain:
        path = directory / "case.pkl"
        path.write_bytes(data)
        return path
    storages = {"0": bytes(64), "1": bytes(16)}
    return torch_zip(directory / "case.pt", data, storages, deflate=frozenset({"archive/data.pkl"}) if rng.random() < 0.1 else frozenset())
