"""Parse pickles without executing them.

Two steps. `scan.scan_pickle` walks the opcodes once, checks every length and memo index against
the bytes actually present (so no number read from the file can make us allocate), and finds
STOP. Then CPython's C unpickler builds the object graph with `find_class` overridden: a short
allowlist of torch rebuild functions and containers maps to pure-data constructors defined here,
and every other global becomes an inert class whose instances only record the arguments they
were given. No module named in the file is ever imported; nothing from the file is ever called.
"""

from __future__ import annotations

import _compat_pickle
import functools
import itertools
import pickle
import threading
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ...checkpoint import (
    GlobalRef,
    RefuseBuild,
    StorageRecord,
    TensorRecord,
    collect_refused_builds,
)
from ...errors import MscopeError, UnsafePickleError
from .scan import CRAFTED, DAMAGED, MAX_HASHED_KEYS, scan_exact, scan_pickle


# ----------------------------------------------------------------------------------------------
# Inert stand-ins for globals we refuse to import
# ----------------------------------------------------------------------------------------------
def _acts_on_global(verb: str) -> Callable[[Callable[..., Any]], Any]:
    """Decorate an Inert method so that, looked up on a generated class itself (the global the
    pickle named) instead of on an instance, it records tampering. BUILD finds `__setstate__`,
    APPEND(S) `append`/`extend` and ADDITEMS `add` by attribute lookup on their target; when the
    target is a module or class named by GLOBAL, a real load would overwrite or extend module
    state (`torch._utils._rebuild_tensor_v2 = os.system`), not build an object."""

    def wrap(method: Callable[..., Any]) -> Any:
        return _GlobalGuard(method, verb)

    return wrap


class _GlobalGuard:
    __slots__ = ("method", "verb")

    def __init__(self, method: Callable[..., Any], verb: str):
        self.method = method
        self.verb = verb

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is not None:
            return self.method.__get__(obj, owner)
        ref = getattr(owner, "_global", None)
        if ref is None:  # Inert itself (introspection, never the pickle)
            return self.method
        return functools.partial(_tamper, ref, self.verb)


class _InertMeta(type):
    """Metaclass of the generated inert classes: what the pickle does to the global itself.
    REDUCE, and OBJ/INST with arguments, call it (type.__call__); NEWOBJ only asks for
    `__new__` (see _new_records); SETITEM(S) on it writes into module state."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Inert:
        judge_call(cls._global, args, kwargs)  # type: ignore[attr-defined]
        return Inert.__new__(cls, *args, **kwargs)

    def __setitem__(cls, key: Any, value: Any) -> None:
        _tamper(cls._global, "setitem", key, value)  # type: ignore[attr-defined]


class Inert:
    """An object of a class (or result of a call) the pickle named. It only records."""

    _global: GlobalRef  # set on each generated subclass
    __slots__ = ("args", "kwargs", "state", "items", "listitems", "callee", "__weakref__")

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        self = object.__new__(cls)
        self.args = args
        self.kwargs = kwargs
        self.state = None
        self.items = None
        self.listitems = None
        self.callee = None  # set on the result of calling an instance: callee(*args)
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    @_acts_on_global("build")
    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> Inert:
        """REDUCE on an instance: `functools.partial(f, x)()`, `getattr(os, 'system')('cmd')`.

        Payloads chain calls this way; record the call on the instance's global and return
        another inert result (never fail: the file must still open and show what it would do).
        Calling an object runs its class's code with arguments the pickle chose: dangerous.
        """
        cls = type(self)
        result = Inert.__new__(cls, *args, **kwargs)
        result.callee = self
        ref = cls._global
        if len(ref.calls) < MAX_CALLS_SHOWN:
            ref.calls.append(_render_arg(result))
        _escalate(ref, CALLS_OBJECT)
        return result

    def __setitem__(self, key: Any, value: Any) -> None:
        if self.items is None:
            self.items = {}
        try:
            self.items[key] = value
        except TypeError:
            self.items[repr(key)] = value

    @_acts_on_global("append")
    def append(self, value: Any) -> None:
        if self.listitems is None:
            self.listitems = []
        self.listitems.append(value)

    @_acts_on_global("extend")
    def extend(self, values: Any) -> None:
        for value in values:
            self.append(value)

    @_acts_on_global("add")
    def add(self, value: Any) -> None:
        self.append(value)

    @property
    def qualname(self) -> str:
        return type(self)._global.qualname

    def state_dict(self) -> dict | None:
        """The instance dict the object was built with, when it is one (nn.Module, Namespace...)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]  # (dict, slotstate)
        return state if isinstance(state, dict) else None

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


class Call(Inert):
    """Marker base for inert results of calling a global (REDUCE on a function)."""


# ----------------------------------------------------------------------------------------------
# Pure-data stand-ins for the torch pieces we understand
# ----------------------------------------------------------------------------------------------
_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "QUInt8Storage": "quint8",
    "QInt8Storage": "qint8",
    "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
    "UntypedStorage": "uint8",
}

TORCH_DTYPES = {
    "float64": "float64", "double": "float64", "float32": "float32", "float": "float32",
    "float16": "float16", "half": "float16", "bfloat16": "bfloat16",
    "complex128": "complex128", "cdouble": "complex128", "complex64": "complex64",
    "cfloat": "complex64", "complex32": "complex32", "chalf": "complex32",
    "int64": "int64", "long": "int64", "int32": "int32", "int": "int32", "int16": "int16",
    "short": "int16", "int8": "int8", "uint8": "uint8", "uint16": "uint16", "uint32": "uint32",
    "uint64": "uint64", "bool": "bool", "float8_e4m3fn": "float8_e4m3fn",
    "float8_e5m2": "float8_e5m2", "float8_e4m3fnuz": "float8_e4m3fnuz",
    "float8_e5m2fnuz": "float8_e5m2fnuz", "float8_e8m0fnu": "float8_e8m0fnu",
    "float4_e2m1fn_x2": "float4_e2m1fn_x2", "qint8": "qint8", "quint8": "quint8",
    "qint32": "qint32", "quint4x2": "quint4x2", "quint2x4": "quint2x4",
}  # fmt: skip

MAX_DIMS = 64
MAX_DIM = 1 << 62


class DType(str):
    """A torch dtype named by the pickle (`torch.float16`), kept as its name."""

    __slots__ = ()
    __setstate__ = RefuseBuild()


class StorageType:
    __slots__ = ("dtype", "name")
    __setstate__ = RefuseBuild()  # BUILD must not retype a storage after find_class made it

    def __init__(self, name: str, dtype: str):
        self.name = name
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class TorchSize(tuple):
    __slots__ = ()
    __setstate__ = RefuseBuild()
    __hash__ = object.__hash__  # by identity: a tuple's hash is the file's choice (MAX_HASHED_KEYS)


class _Frozenset(frozenset):
    """frozenset(...) as a pickle's REDUCE builds it: hashed by identity, for the same reason."""

    __slots__ = ()
    __hash__ = object.__hash__


class _Complex(complex):
    __slots__ = ()
    __hash__ = object.__hash__


_hash_budget = threading.local()  # hashy members the running safe_load's set builders may add


def hashy(value: Any) -> bool:
    """Whether a value's hash is the file's choice (see MAX_HASHED_KEYS)."""
    kind = type(value)
    if kind is int:
        return not -(1 << 55) < value < 1 << 55
    if kind is bool:
        return False
    return kind in (float, complex, tuple, frozenset) or (
        isinstance(value, (int, float, complex, tuple, frozenset)) and kind.__hash__ is not object.__hash__
    )


def _charge_hashy(count: int) -> None:
    left = getattr(_hash_budget, "left", None)
    if left is None or not count:
        return
    _hash_budget.left = left - count
    if left - count < 0:
        raise UnsafePickleError(
            f"more than {MAX_HASHED_KEYS:,} dict keys or set members are numbers or tuples, "
            "whose hashes a file can make collide (hash flooding)", hint=CRAFTED,
        )  # fmt: skip


class Device(str):
    """torch.device('cuda', 1) -> 'cuda:1'."""

    __slots__ = ()
    __setstate__ = RefuseBuild()


_TENSOR_SEQ = itertools.count()


_object_new = object.__new__


class TensorRef(TensorRecord):
    """A tensor as the pickle describes it, before the walker names it. `storage` is whatever
    persistent_load returned. The walker claims the object itself as the checkpoint's record
    (Walker.add_tensor): one object per tensor instead of two, 100k of them in a big state_dict.
    Until then only the fields set here exist; `name` is None."""

    __slots__ = ("is_parameter", "subclass", "__weakref__")

    # The signature of torch._utils._rebuild_tensor_v2, so the unpickler calls the class itself
    # (one Python call per tensor instead of two); hooks and metadata are ignored. Built and
    # validated in __new__, not __init__: NEWOBJ calls only `cls.__new__(cls, *args)`, and an
    # instance that skipped validation (no storage, no shape) reached the walker.
    __init__ = object.__init__

    def __new__(
        cls,
        storage: Any,
        offset: Any,
        shape: Any,
        stride: Any,
        requires_grad: Any = False,
        backward_hooks: Any = None,
        metadata: Any = None,
        *,
        dtype: str | None = None,
    ) -> TensorRef:
        self = _object_new(cls)
        self.name = None
        self.storage = storage
        numel = 1  # the walker needs it when it claims this record
        if type(shape) is tuple and type(stride) is tuple and len(shape) == len(stride) <= MAX_DIMS:
            for value in shape:  # inline: this runs once per tensor, 100k times in a big file
                if type(value) is not int or not 0 <= value < MAX_DIM:
                    raise UnsafePickleError(f"tensor has an invalid shape {_short(shape)}")
                numel *= value
            for value in stride:
                if type(value) is not int or not 0 <= value < MAX_DIM:
                    raise UnsafePickleError(f"tensor has an invalid stride {_short(stride)}")
        else:
            shape = _check_dims(shape, "shape")
            stride = _check_dims(stride, "stride") if stride is not None else _contiguous(shape)
            if len(stride) != len(shape):
                raise UnsafePickleError(f"tensor stride {stride} does not match its shape {shape}")
            for value in shape:
                numel *= value
        self.numel = numel
        self.shape = shape
        self.stride = stride
        if type(offset) is not int or not 0 <= offset < MAX_DIM:
            raise UnsafePickleError(f"tensor has an invalid storage offset {offset!r}")
        self.storage_offset = offset
        self.requires_grad = requires_grad is True or (type(requires_grad) is int and requires_grad != 0)
        self.is_parameter = False
        self.dtype = dtype or (storage.dtype if type(storage) is StorageRecord else None)
        self.note = None
        self.quant = None  # quant.annotate fills these in once the file is read
        self.companion_of = None
        self.subclass = None
        # Creation order = order of the rebuild calls in the pickle stream (writers patch by it).
        self.pickle_seq = next(_TENSOR_SEQ)
        return self

    def __repr__(self) -> str:
        return f"TensorRef({self.dtype}, {list(self.shape)})"


def _check_dims(values: Any, what: str) -> tuple[int, ...]:
    # A plain loop: this runs twice per tensor, and beats set/min/max 5x on 1-4 dims.
    if type(values) is not tuple:
        values = tuple(values) if type(values) in (list, TorchSize) else None
        if values is None:
            raise UnsafePickleError(f"tensor has an invalid {what}")
    if len(values) > MAX_DIMS:
        raise UnsafePickleError(f"tensor has an invalid {what}")
    for value in values:
        if type(value) is not int or not 0 <= value < MAX_DIM:
            raise UnsafePickleError(f"tensor has an invalid {what} {_short(values)}")
    return values


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def _short(value: Any, limit: int = 80) -> str:
    if isinstance(value, (str, bytes, bytearray)) and len(value) > limit:
        value = value[:limit]  # never repr a huge string only to cut it
    try:
        text = repr(value)
    except RecursionError:  # containers nested thousands deep (frozensets, user objects)
        text = f"<deeply nested {type(value).__name__}>"
    except ValueError:  # an int over 4,300 digits
        text = f"<{type(value).__name__} too long to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, dtype=None, metadata=None):
    dtype_name = str(dtype) if isinstance(dtype, DType) else None
    return TensorRef(storage, storage_offset, size, stride, requires_grad, dtype=dtype_name)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return TensorRef(storage, storage_offset, size, stride, False)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
    if isinstance(data, TensorRef):
        data.is_parameter = True
        data.requires_grad = bool(requires_grad) if isinstance(requires_grad, (bool, int)) else True
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    result = func(*args) if callable(func) and isinstance(args, tuple) else None
    if isinstance(result, TensorRef):
        if new_type is PARAMETER_TYPE:
            result.is_parameter = True
        elif new_type is not TENSOR_TYPE:
            result.subclass = getattr(getattr(new_type, "_global", None), "qualname", repr(new_type))
    return result


def _rebuild_without_storage(kind: str) -> Callable[..., TensorRef | None]:
    """Quantized, sparse, meta and other exotic tensors: shape and dtype when the args say so."""

    def rebuild(*args: Any, **kwargs: Any) -> TensorRef | None:
        storage = args[0] if args and isinstance(args[0], StorageRecord) else None
        if kind == "meta" and len(args) >= 3 and isinstance(args[0], DType):
            ref = TensorRef(None, 0, args[1], args[2], False, dtype=str(args[0]))
        elif storage is not None and len(args) >= 4:
            ref = TensorRef(storage, args[1], args[2], args[3], False)
        else:
            return None
        ref.note = kind
        return ref

    return rebuild


class _TypeMarker:
    __slots__ = ("name",)
    __setstate__ = RefuseBuild()

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


TENSOR_TYPE = _TypeMarker("torch.Tensor")
PARAMETER_TYPE = _TypeMarker("torch.nn.parameter.Parameter")


def _torch_device(*args: Any) -> Device:
    if len(args) == 1 and isinstance(args[0], str):
        return Device(args[0][:64])
    if len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], int):
        return Device(f"{args[0][:32]}:{args[1]}")
    raise UnsafePickleError(f"invalid torch.device arguments {_short(args)}")


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise UnsafePickleError(f"unexpected _codecs.encode arguments {_short((text, encoding))}")
    return text.encode(encoding, errors="surrogatepass")


def _data_only(kind: type) -> Callable[..., Any]:
    """set/frozenset/etc. built only from pickle data (never from a count)."""

    def build(*args: Any) -> Any:
        if args and not isinstance(args[0], (list, tuple, set, frozenset, dict, str, bytes)):
            raise UnsafePickleError(f"unexpected {kind.__name__} arguments {_short(args)}")
        if args and isinstance(args[0], (list, tuple)):  # members hashed as the set is built
            _charge_hashy(sum(map(hashy, args[0])))
        return kind(*args)

    return build


def _complex(*args: Any) -> complex:
    return _Complex(*args)


def _bytes_from_text(kind: type) -> Callable[..., Any]:
    """Protocol-2 pickles write bytes/bytearray as (text, 'latin-1'); never accept a count."""

    def build(*args: Any) -> Any:
        if not args:
            return kind()
        if isinstance(args[0], (bytes, bytearray)) and len(args) == 1:
            return kind(args[0])
        if isinstance(args[0], str) and len(args) == 2 and args[1] in ("latin-1", "latin1", "utf-8"):
            return kind(args[0], args[1])
        raise UnsafePickleError(f"unexpected {kind.__name__} arguments {_short(args)}")

    return build


def _reconstructor(cls: Any, base: Any = None, state: Any = None) -> Any:
    """copyreg._reconstructor as protocol 0/1 pickles use it: `base.__new__(cls, state)`, then
    `base.__init__(obj, state)` unless base is object. An empty object of `cls` (its dict
    contents when base is dict); a base other than object or a builtin data type would have
    its `__init__` run with the pickle's state: judged as a call of that base."""
    if not (isinstance(cls, type) and issubclass(cls, Inert)):
        raise UnsafePickleError(f"unexpected copyreg._reconstructor target {_short(cls)}")
    obj = Inert.__new__(cls)
    if isinstance(base, type) and issubclass(base, Inert):
        if base._global.qualname not in DATA_TYPES:
            judge_call(base._global, (state,), {})
    elif base is not None and base is not OrderedDict:
        raise UnsafePickleError(f"unexpected copyreg._reconstructor base {_short(base)}")
    if isinstance(state, dict):
        for key, value in state.items():
            obj[key] = value
    return obj


def _passthrough(value: Any = None, *rest: Any) -> Any:
    _charge_hashy(hashy(value))  # the scans count what REDUCE returns as not hashy
    return value


SAFE_FUNCTIONS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): _data_only(set),
    ("builtins", "frozenset"): _data_only(_Frozenset),
    ("builtins", "complex"): _complex,
    ("builtins", "slice"): slice,
    ("builtins", "bytes"): _bytes_from_text(bytes),
    ("builtins", "bytearray"): _bytes_from_text(bytearray),
    ("copyreg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _codecs_encode,
    ("torch._utils", "_rebuild_tensor_v2"): TensorRef,
    # DCP metadata names the layout through this helper; it only maps a name to a constant.
    ("torch.serialization", "_get_layout"): lambda name="torch.strided": str(name)[:64],
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch._utils", "_rebuild_qtensor"): _rebuild_without_storage("quantized"),
    ("torch._utils", "_rebuild_sparse_tensor"): _rebuild_without_storage("sparse"),
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): _rebuild_without_storage("meta"),
    ("torch._utils", "_rebuild_wrapper_subclass"): _rebuild_without_storage("wrapper subclass"),
    ("torch._utils", "_rebuild_nested_tensor"): _rebuild_without_storage("nested"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"): _rebuild_without_storage("numpy"),
    ("torch", "Size"): TorchSize,
    ("torch", "device"): _torch_device,
    ("torch", "Tensor"): TENSOR_TYPE,
    ("torch._tensor", "Tensor"): TENSOR_TYPE,
    ("torch.nn.parameter", "Parameter"): PARAMETER_TYPE,
    # TorchScript pickles wrap lists in these; they only tag types.
    ("torch.jit._pickle", "restore_type_tag"): _passthrough,
    ("torch.jit._pickle", "build_intlist"): _passthrough,
    ("torch.jit._pickle", "build_tensorlist"): _passthrough,
    ("torch.jit._pickle", "build_doublelist"): _passthrough,
    ("torch.jit._pickle", "build_boollist"): _passthrough,
    ("torch.jit._pickle", "build_tensor_from_id"): _passthrough,
}



class _SealedFunction:
    """An allowlisted function as find_class hands it out. A plain function object would let
    BUILD set its `__defaults__` or `__dict__` (for every later file in this process); this
    wrapper has no attributes to set and refuses BUILD (RefuseBuild)."""

    __slots__ = ("_fn", "qualname")
    __setstate__ = RefuseBuild()

    def __init__(self, fn: Callable[..., Any], qualname: str):
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "qualname", qualname)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{self.qualname} is sealed")

    def __repr__(self) -> str:
        return self.qualname


SAFE_FUNCTIONS = {
    key: _SealedFunction(value, f"{key[0]}.{key[1]}") if type(value) is types.FunctionType else value
    for key, value in SAFE_FUNCTIONS.items()
}
_SAFE_KEY_OF: dict[int, tuple[str, str]] = {}
for _key, _value in SAFE_FUNCTIONS.items():
    _SAFE_KEY_OF.setdefault(id(_value), _key)  # the first (public) name of a shared value


def _build_target(target: Any) -> tuple[str, str]:
    """(module, name) of what a refused BUILD aimed at, as the pickle would have named it."""
    if type(target) is TensorRef or isinstance(target, TensorRecord):
        return "torch", "Tensor"
    if isinstance(target, StorageRecord):
        return "torch.storage", "TypedStorage"
    if isinstance(target, StorageType):
        return "torch", target.name
    if isinstance(target, DType):
        return "torch", str(target)
    key = _SAFE_KEY_OF.get(id(target))
    if key is not None:
        return key
    return type(target).__module__, type(target).__qualname__


def refused_build_refs(refused: list[tuple[Any, Any]], source: str) -> list[GlobalRef]:
    """One GlobalRef per object a BUILD tried to rewrite: `torch.Tensor.__setstate__(...)`."""
    refs: dict[tuple[str, str], GlobalRef] = {}
    for target, state in refused:
        module, name = _build_target(target)
        key = (module, f"{name}.__setstate__")
        ref = refs.get(key)
        if ref is None:
            ref = refs[key] = GlobalRef(
                module, key[1], "dangerous", pickle=source,
                reason="tampering: rewrites an object after it was built (BUILD); mscope refused the change",
            )  # fmt: skip
        ref.count += 1
        if len(ref.calls) < MAX_CALLS_SHOWN:
            ref.calls.append(render_call(ref.qualname, (state,)))
    return list(refs.values())


def _fingerprint(value: Any) -> tuple:
    """What BUILD can change on one of our stand-ins (a function's dict and defaults, a class's or
    marker's attributes): compared after each load, see stand_ins_tampered."""
    if isinstance(value, type):
        return tuple((k, id(v)) for k, v in vars(value).items())
    if hasattr(value, "__code__"):
        return (value.__code__, value.__defaults__, value.__kwdefaults__, tuple(vars(value).items()))
    if isinstance(value, _TypeMarker):
        return (value.name,)
    return ()


_FINGERPRINTS = {key: _fingerprint(value) for key, value in SAFE_FUNCTIONS.items()}


def stand_ins_tampered() -> list[tuple[str, str]]:
    """Allowlisted globals whose stand-in a pickle changed (BUILD on the global itself sets a
    function's attributes or a class's methods), restored to what they were. The C unpickler
    does this before we can refuse it; undoing it keeps the next file in this process honest."""
    changed = []
    for key, before in _FINGERPRINTS.items():
        value = SAFE_FUNCTIONS[key]
        if _fingerprint(value) == before:
            continue
        changed.append(key)
        if hasattr(value, "__code__") and not isinstance(value, type):
            value.__code__, value.__defaults__, value.__kwdefaults__ = before[0], before[1], before[2]
            vars(value).clear()
            vars(value).update(before[3])
        elif isinstance(value, _TypeMarker):
            value.name = before[0]
        elif isinstance(value, type):
            originals = _CLASS_ATTRS[value]
            for name in [k for k in vars(value) if k not in originals]:
                delattr(value, name)
            for name, attr in originals.items():
                if vars(value).get(name) is not attr:
                    setattr(value, name, attr)
    return changed


_CLASS_ATTRS = {v: dict(vars(v)) for v in SAFE_FUNCTIONS.values() if isinstance(v, type)}

_DATA_BUILDERS = tuple(SAFE_FUNCTIONS[("builtins", n)] for n in ("set", "frozenset", "bytes", "bytearray", "complex"))

_TORCH_NAMED_CONSTANTS = {
    "contiguous_format", "channels_last", "channels_last_3d", "preserve_format",
    "strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn",
    "jagged",
}  # fmt: skip

# ----------------------------------------------------------------------------------------------
# What a global could do
# ----------------------------------------------------------------------------------------------
_DANGEROUS_MODULES = (
    "os", "posix", "nt", "subprocess", "sys", "runpy", "importlib", "pickle", "_pickle",
    "cPickle", "pickletools", "copyreg", "copy_reg", "dill", "cloudpickle", "joblib", "marshal",
    "ctypes", "_ctypes", "shutil", "socket", "code", "codeop", "pty", "commands", "webbrowser",
    "multiprocessing", "asyncio", "threading", "_thread", "signal", "pdb", "bdb", "timeit",
    "trace", "profile", "cProfile", "doctest", "pydoc", "platform", "urllib", "urllib2", "http",
    "httplib", "ftplib", "smtplib", "telnetlib", "requests", "zipimport", "imp", "types",
    "inspect", "gc", "pip", "setuptools", "distutils", "venv", "ensurepip", "site", "tempfile",
    "glob", "fileinput", "linecache", "io", "_io", "codecs", "shelve", "dbm", "sqlite3", "tarfile",
    "zipfile", "operator", "_operator", "functools", "_functools",
    "torch.hub", "torch.utils.cpp_extension", "torch._dynamo", "torch._inductor", "torch.jit",
    "torch._C", "torch.ops", "torch.package", "torch.distributed.rpc", "torch.multiprocessing",
    "numpy.testing", "numpy.f2py", "numpy.distutils", "numpy.ctypeslib", "IPython", "ipykernel",
)  # fmt: skip

_DANGEROUS_NAMES = {
    "builtins": {
        "eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr",
        "globals", "locals", "vars", "input", "breakpoint", "help", "exit", "quit", "memoryview",
        "type", "classmethod", "staticmethod", "property", "super", "print",
        "range", "map", "filter", "zip", "iter", "next", "apply",
        "execfile", "reload", "file", "dir", "id", "hasattr", "callable", "__build_class__",
    },
    "__builtin__": {"eval", "exec", "execfile", "compile", "open", "file", "__import__", "getattr", "apply", "reload", "input"},
    "torch": {"load", "save", "from_file", "_load_global_deps", "compile", "set_default_device"},
    "torch.serialization": None,  # every name: load, _load, ...
    "torch.storage": {"_load_from_bytes"},
    "torch._weights_only_unpickler": None,
    "numpy": {"load", "loadtxt", "genfromtxt", "fromfile", "memmap", "save", "savez", "frombuffer"},
    "numpy.lib.npyio": None,
}  # fmt: skip

_EFFECTS = {
    "os.system": "run a shell command",
    "posix.system": "run a shell command",
    "nt.system": "run a shell command",
    "subprocess": "start a process",
    "builtins.eval": "evaluate Python code",
    "builtins.exec": "execute Python code",
    "builtins.compile": "compile Python code",
    "builtins.__import__": "import a module",
    "builtins.getattr": "fetch an arbitrary attribute",
    "builtins.open": "open a file",
    "runpy": "run a Python module or file",
    "importlib": "import a module",
    "pickle": "unpickle nested data (with no restrictions)",
    "_pickle": "unpickle nested data (with no restrictions)",
    "torch.load": "load a nested torch pickle",
    "torch.serialization": "load a nested torch pickle",
    "torch.storage._load_from_bytes": "load a nested torch pickle",
    "operator.attrgetter": "fetch an arbitrary attribute",
    "operator.methodcaller": "call an arbitrary method",
    "functools.partial": "wrap a call to an arbitrary function",
    "shutil": "copy, move or delete files",
    "socket": "open a network connection",
    "webbrowser": "open a URL",
    "ctypes": "call native code",
    "marshal": "load compiled code",
    "types": "build functions or code objects",
    # The explanations below only word the report: calling any global outside DATA_CALLS is
    # dangerous whether or not it is listed here.
    "os": "run commands or change files",
    "posix": "run commands or change files",
    "nt": "run commands or change files",
    "pty": "start a shell",
    "builtins.setattr": "overwrite an attribute of any object",
    "builtins.delattr": "delete an attribute of any object",
    "builtins.type": "create a class",
    "pkgutil.resolve_name": "return any function by its name (e.g. 'os:system')",
    "pkgutil": "import modules by name",
    "uuid._get_command_stdout": "run a command",
    "torch.utils.collect_env": "run a shell command",
    "_interpreters": "run Python code in a subinterpreter",
    "_xxsubinterpreters": "run Python code in a subinterpreter",
    "interpreters": "run Python code in a subinterpreter",
    "logging.FileHandler": "create or append to a file at a path the pickle chooses",
    "logging.handlers": "write files or open network connections",
    "logging.config": "load logging configuration (which can import and call anything)",
    "code": "run Python code",
    "codeop": "compile Python code",
    "timeit": "run Python code",
    "cProfile": "run Python code",
    "profile": "run Python code",
    "trace": "run Python code",
    "pdb": "run Python code",
    "bdb": "run Python code",
    "doctest": "run Python code",
    "pydoc": "run a shell command",
    "platform": "run a command",
    "multiprocessing": "start processes",
    "asyncio": "start processes or open network connections",
    "threading": "start threads",
    "_thread": "start threads",
    "sys": "change the interpreter's state",
    "gc": "reach any object in the process",
    "inspect": "reach into frames and objects",
    "site": "change import paths",
    "zipimport": "import code from an archive",
    "imp": "import a module",
    "copyreg": "change how objects are pickled and unpickled",
    "dill": "unpickle nested data (with no restrictions)",
    "cloudpickle": "unpickle nested data (with no restrictions)",
    "joblib": "unpickle nested data (with no restrictions)",
    "io": "open a file",
    "_io": "open a file",
    "codecs.open": "open a file",
    "tempfile": "create files",
    "shelve": "open a database file (and unpickle from it)",
    "tarfile": "read or write archives and files",
    "zipfile": "read or write archives and files",
    "sqlite3": "open a database file",
    "http": "open network connections",
    "urllib": "open network connections",
    "requests": "open network connections",
    "ftplib": "open network connections",
    "smtplib": "open network connections",
    "telnetlib": "open network connections",
    "torch.hub": "download and run code",
    "torch.jit": "compile and run TorchScript",
    "torch.utils.cpp_extension": "compile and load native code",
    "torch._dynamo": "compile and run code",
    "torch._inductor": "compile and run code",
    "torch.package": "import code from a package archive",
    "torch.distributed.rpc": "run code on remote workers",
    "torch.multiprocessing": "start processes",
    "numpy.load": "load a nested pickle (allow_pickle)",
    "numpy.f2py": "compile code",
    "numpy.testing": "run Python code",
}


def classify_global(module: str, name: str) -> tuple[str, str]:
    """('safe'|'unsafe'|'dangerous', reason) for a global a pickle names."""
    if (module, name) in SAFE_FUNCTIONS or _torch_data_global(module, name) is not None:
        return "safe", "allowlisted"
    if "." in name:
        return _classify_attribute_path(module, name)
    names = _DANGEROUS_NAMES.get(module, ())
    if names is None or name in names or _dangerous_module(module):
        return "dangerous", _effect(module, name)
    return "unsafe", "not in the weights_only allowlist; would be imported by a plain torch.load"


def _classify_attribute_path(module: str, name: str) -> tuple[str, str]:
    """Protocol 4+ resolves a dotted name attribute by attribute, so ('pathlib', 'os.system')
    is os.system and ('torch', 'serialization.load') is torch.load: judge every reading."""
    full = [module, *name.split(".")]
    if any(part.startswith("__") and part.endswith("__") for part in full[1:]):
        return "dangerous", "reaches into object internals through an attribute path (can execute code)"
    for i in range(len(full) - 1):
        inner = ".".join(full[i:-1])
        if classify_global(inner, full[-1])[0] == "dangerous":
            return "dangerous", f"{_effect(inner, full[-1])} (it is {inner}.{full[-1]})"
    return "unsafe", "an attribute path not in the weights_only allowlist; a plain torch.load would follow it"


_DANGEROUS_MODULE_SET = frozenset(_DANGEROUS_MODULES)


def _dangerous_module(module: str) -> bool:
    """`module` or any package above it is on the list (one set lookup per dotted level)."""
    parts = module.split(".", 16)
    return any(".".join(parts[:i]) in _DANGEROUS_MODULE_SET for i in range(1, len(parts) + 1))


def _effect(module: str, name: str) -> str:
    return f"can {known_effect(module, name) or 'execute code when loaded'}"


def known_effect(module: str, name: str) -> str | None:
    """What a known-bad global does ("run a shell command"), or None. Only words the report:
    whether a global is dangerous depends on what the pickle does with it (judge_call)."""
    qual = f"{module}.{name}"
    parts = module.split(".")
    for key in (qual, *(".".join(parts[:i]) for i in range(len(parts), 0, -1))):
        if key in _EFFECTS:
            return _EFFECTS[key]
    return None


# ----------------------------------------------------------------------------------------------
# What the pickle does with a global: name it, rebuild an object of it, call it, or tamper
# ----------------------------------------------------------------------------------------------
# A global the pickle only names, or whose objects it rebuilds the way torch.save(model) does
# (NEWOBJ with no arguments or with plain data, then BUILD), keeps its classification above
# ("unsafe" unless known-bad). A global the pickle *calls* with arguments it chooses (REDUCE,
# OBJ/INST with arguments, NEWOBJ with objects, an object it built being called) is dangerous
# unless it is a pure-data constructor given plain data (DATA_CALLS). A list of known-bad names
# cannot keep up with the next gadget; this rule does not need to.
CALLED = (
    "called by the pickle with arguments it chooses, and not a known data constructor: "
    "a plain torch.load would import it and run it"
)
NEW_WITH_OBJECTS = (
    "its __new__ is called with objects the pickle chooses (how gadgets such as "
    "functools.partial(os.system, ...) are assembled)"
)
CALLS_OBJECT = "the pickle calls an object of this class that it built: a plain torch.load would run the class's code"
TAMPERS = (
    "the pickle overwrites attributes or entries of this module or class: tampering with "
    "module state, an attack (a later torch.load or call would run what it put there)"
)
MAX_DATA_NODES = 100_000

# Builtin types whose instances are plain values: copyreg._reconstructor bases, defaultdict
# factories, and data constructors below.
DATA_TYPES = frozenset(
    f"builtins.{n}" for n in ("object", "dict", "list", "tuple", "set", "frozenset", "int",
                              "float", "complex", "str", "bytes", "bytearray", "bool")
)  # fmt: skip
_PLAIN_TYPES = (str, bytes, bytearray, int, float, bool, complex, type(None), DType, Device)
_CONTAINER_TYPES = (tuple, list, dict, set, frozenset, OrderedDict, TorchSize)


def is_data(value: Any) -> bool:
    """True when `value` is plain pickle data: numbers, text, bytes, containers of them, tensor
    records, and objects built by DATA_CALLS. Globals (classes, functions) and objects of other
    classes are not data. Bounded: shared sub-objects are visited once, at most MAX_DATA_NODES."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if type(v) in _PLAIN_TYPES or isinstance(v, (TensorRecord, StorageRecord, StorageType)):
            continue
        if id(v) in seen:
            continue
        seen.add(id(v))
        if len(seen) > MAX_DATA_NODES:
            return False
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, _CONTAINER_TYPES):
            stack.extend(v)
        elif isinstance(v, Inert):
            ref = type(v)._global
            if v.callee is not None or ref.safety == "dangerous" or (ref.module, ref.name) not in DATA_CALLS:
                return False
            stack.extend((v.args, v.kwargs))
        elif isinstance(v, type) and issubclass(v, Inert):
            if v._global.qualname not in DATA_TYPES:
                return False
        else:
            return False
    return True


def _plain_args(args: tuple, kwargs: dict) -> bool:
    return is_data(args) and is_data(kwargs)


def _no_args(args: tuple, kwargs: dict) -> bool:
    return not args and not kwargs


def _is_global(value: Any, *qualnames: str) -> bool:
    return isinstance(value, type) and issubclass(value, Inert) and value._global.qualname in qualnames


def _data_factory(value: Any) -> bool:
    return value is None or value is OrderedDict or _is_global(value, *DATA_TYPES) or value in _DATA_BUILDERS


def _defaultdict_args(args: tuple, kwargs: dict) -> bool:
    return not kwargs and (not args or (_data_factory(args[0]) and is_data(args[1:])))


def _ndarray_args(args: tuple, kwargs: dict) -> bool:
    """numpy's _reconstruct(ndarray, shape, typecode): an empty array BUILD then fills with bytes."""
    return not kwargs and len(args) == 3 and _is_global(args[0], "numpy.ndarray") and is_data(args[1:])


def _dtype_args(args: tuple, kwargs: dict) -> bool:
    return not kwargs and bool(args) and type(args[0]) is str and is_data(args)


def _scalar_args(args: tuple, kwargs: dict) -> bool:
    """numpy's scalar(dtype, bytes): a number from its bytes (the dtype built by numpy.dtype)."""
    return (
        not kwargs and 1 <= len(args) <= 2 and isinstance(args[0], Inert)
        and args[0].qualname == "numpy.dtype" and is_data(args)
    )  # fmt: skip


def _text_args(args: tuple, kwargs: dict) -> bool:
    return not kwargs and all(type(a) is str for a in args)


# Pure-data constructors the pickle may call: given arguments that pass the check, each builds
# a value from them and does nothing else (no import, no file, no attribute lookup by name, no
# call of anything it is given). Anything else called is dangerous (judge_call).
DATA_CALLS: dict[tuple[str, str], Callable[[tuple, dict], bool]] = {
    **{("builtins", n): _plain_args for n in ("dict", "list", "tuple", "int", "float", "str", "bool")},
    ("builtins", "object"): _no_args,
    ("collections", "defaultdict"): _defaultdict_args,
    ("collections", "Counter"): _plain_args,
    ("collections", "deque"): _plain_args,
    **{("datetime", n): _plain_args for n in ("datetime", "date", "time", "timedelta", "timezone")},
    ("decimal", "Decimal"): _plain_args,
    ("fractions", "Fraction"): _plain_args,
    **{("pathlib", n): _text_args for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")},
    ("numpy.core.multiarray", "_reconstruct"): _ndarray_args,
    ("numpy._core.multiarray", "_reconstruct"): _ndarray_args,
    ("numpy", "dtype"): _dtype_args,
    # protocol 5: frombuffer(bytes, dtype).reshape(shape, order=order)
    ("numpy.core.numeric", "_frombuffer"): _plain_args,
    ("numpy._core.numeric", "_frombuffer"): _plain_args,
    ("numpy.core.multiarray", "scalar"): _scalar_args,
    ("numpy._core.multiarray", "scalar"): _scalar_args,
}  # fmt: skip


def _record_call(ref: GlobalRef, text: str, important: bool) -> None:
    if len(ref.calls) < MAX_CALLS_SHOWN:
        ref.calls.append(text)
    elif important and ref.safety != "dangerous":
        ref.calls[-1] = text  # the call that made it dangerous is the one to show


def _escalate(ref: GlobalRef, reason: str, force: bool = False) -> None:
    if ref.safety != "dangerous" or force:
        effect = known_effect(ref.module, ref.name)
        ref.reason = f"{reason}; it can {effect}" if effect and not force else reason
        ref.safety = "dangerous"


def judge_call(ref: GlobalRef, args: tuple, kwargs: dict) -> None:
    """REDUCE, or OBJ/INST with arguments: the pickle calls `ref(*args, **kwargs)`."""
    check = DATA_CALLS.get((ref.module, ref.name))
    data = ref.safety == "safe" or (check is not None and check(args, kwargs))  # safe: a format's schema
    if args or kwargs or not data:
        _record_call(ref, render_call(ref.qualname, args, kwargs), not data)
    if not data:
        _escalate(ref, CALLED)


def judge_new(ref: GlobalRef, args: tuple, kwargs: dict) -> None:
    """NEWOBJ(_EX) with arguments: `cls.__new__(cls, *args)`. Given plain data this is how pickle
    rebuilds tuple, int and str subclasses (namedtuples) and stays "unsafe"; given globals or
    objects it assembles a gadget (`functools.partial.__new__(partial, os.system, 'cmd')`)."""
    data = ref.safety == "safe" or _plain_args(args, kwargs)
    _record_call(ref, render_call(f"{ref.qualname}.__new__", args, kwargs), not data)
    if not data:
        _escalate(ref, NEW_WITH_OBJECTS)


def _tamper(ref: GlobalRef, verb: str, *args: Any) -> None:
    """BUILD, SETITEM, APPEND(S) or ADDITEMS on a global itself (see _acts_on_global)."""
    out = _Renderer(160)
    if verb == "build":
        state = args[0] if args else None
        items: list[tuple[Any, Any]] = []
        for part in state if isinstance(state, tuple) and len(state) == 2 else (state,):
            if isinstance(part, dict):
                items.extend(itertools.islice(part.items(), 8))
        if not items:
            out.put(f"{ref.qualname}.__setstate__(")
            out.value(state, 1)
            out.put(")")
        for i, (key, value) in enumerate(items):
            if i:
                out.put("; ")
            out.put(f"{ref.qualname}.{key}" if isinstance(key, str) else f"{ref.qualname}.{_short(key, 40)}")
            out.put(" = ")
            out.value(value, 1)
    elif verb == "setitem":
        out.put(f"{ref.qualname}[")
        out.value(args[0], 1)
        out.put("] = ")
        out.value(args[1], 1)
    else:
        out.put(f"{ref.qualname}.{verb}(")
        out.value(args[0] if args else None, 1)
        out.put(")")
    _record_call(ref, out.text(), True)
    _escalate(ref, TAMPERS, force=True)


def _torch_data_global(module: str, name: str) -> Any:
    """dtypes, storage types and layout constants torch pickles as plain globals."""
    if module == "torch":
        if name in TORCH_DTYPES:
            return DType(TORCH_DTYPES[name])
        if name in _TORCH_NAMED_CONSTANTS:
            return f"torch.{name}"
    if module in ("torch", "torch.storage", "torch.cuda") and name.endswith("Storage"):
        dtype = _STORAGE_DTYPES.get(name)
        if dtype is None and name != "TypedStorage":
            guess = name[: -len("Storage")].lower()
            dtype = TORCH_DTYPES.get(guess)
        if dtype is not None:
            return StorageType(name, dtype)
    return None


# ----------------------------------------------------------------------------------------------
# The unpickler
# ----------------------------------------------------------------------------------------------
MAX_CALLS_SHOWN = 3
# Each distinct global costs a class (~2 KB); real checkpoints name dozens to a few thousand
# (TorchScript mangles one per module variant). A 2 MB pickle naming 200,000 took 400 MB and 16 s.
MAX_GLOBALS = 20_000


class _WholeInput:
    """The pickle as a file whose peek() returns everything left. The C unpickler then reads
    from one buffer; given a file without peek() it calls read() for every opcode and argument
    (a million Python calls for a 100k-tensor state_dict: a third of its unpickling time).
    Not a BytesIO: its read() copies, and the unpickler ends by reading past all it consumed."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes | memoryview):
        self.data = data if type(data) is bytes else bytes(data)
        self.pos = 0

    def peek(self, size: int = 0) -> bytes:
        return self.data[self.pos :]  # the whole pickle, no copy, at position 0 where it is asked

    def read(self, size: int = -1) -> bytes:
        start = self.pos
        self.pos = len(self.data) if size is None or size < 0 else min(len(self.data), start + size)
        return self.data[start : self.pos]

    def readinto(self, buffer: Any) -> int:
        chunk = self.read(len(memoryview(buffer).cast("B")))
        memoryview(buffer).cast("B")[: len(chunk)] = chunk
        return len(chunk)

    def readline(self, size: int = -1) -> bytes:
        end = self.data.find(b"\n", self.pos)
        end = len(self.data) if end < 0 else end + 1
        if size is not None and size >= 0:
            end = min(end, self.pos + size)
        return self.read(end - self.pos)


class SafeUnpickler(pickle.Unpickler):
    """C unpickler whose globals all resolve to data-only stand-ins (see module docstring)."""

    def __init__(
        self,
        data: bytes | memoryview,
        *,
        source: str,
        persistent_load: Callable[[Any], Any] | None = None,
        known_schema: Callable[[str, str], bool] | None = None,
    ):
        super().__init__(_WholeInput(data), encoding="utf-8", errors="surrogateescape")
        self.source = source
        if persistent_load is not None:
            self.persistent_load = persistent_load
        self._known_schema = known_schema
        self.globals: dict[tuple[str, str], GlobalRef] = {}
        self._inert_classes: dict[tuple[str, str], type] = {}
        self.tampered: list[tuple[str, str]] = []  # allowlisted stand-ins the pickle changed

    def load(self) -> Any:
        try:
            return super().load()
        finally:
            self.tampered = stand_ins_tampered()
            for key in self.tampered:
                ref = self.globals.get(key)
                if ref is not None:
                    _record_call(ref, f"{ref.qualname}.__setstate__(...)", True)
                    _escalate(ref, TAMPERS, force=True)

    def find_class(self, module: str, name: str) -> Any:
        module, name = str(module)[:256], str(name)[:256]
        # Python 2 names (protocol 2 writes `__builtin__.set`); the C find_class we replace maps them.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        ref = self.globals.get(key)
        if ref is None:
            if len(self.globals) >= MAX_GLOBALS:
                raise UnsafePickleError(f"{self.source}: names more than {MAX_GLOBALS:,} different globals", hint=CRAFTED)
            safety, reason = classify_global(module, name)
            if safety == "unsafe" and self._known_schema is not None and self._known_schema(module, name):
                safety, reason = "safe", "format schema"
            ref = GlobalRef(module, name, safety, pickle=self.source, reason=reason)
            self.globals[key] = ref
        ref.count += 1
        if ref.safety == "safe":
            value = SAFE_FUNCTIONS.get(key)
            if value is None:
                value = _torch_data_global(module, name)
            if value is not None:
                return value
        cls = self._inert_classes.get(key)
        if cls is None:
            cls = self._make_inert(ref)
            self._inert_classes[key] = cls
        return cls

    def _make_inert(self, ref: GlobalRef) -> type:
        def new(cls: type, *args: Any, **kwargs: Any) -> Inert:
            """`cls.__new__(cls, *args)`: NEWOBJ, NEWOBJ_EX, OBJ/INST without arguments."""
            if args or kwargs:
                judge_new(ref, args, kwargs)
            return Inert.__new__(cls, *args, **kwargs)

        safe_name = "".join(c if c.isalnum() or c == "_" else "_" for c in ref.name) or "_"
        return _InertMeta(safe_name, (Inert,), {"__slots__": (), "_global": ref, "__new__": new})


def render_call(qualname: str, args: tuple, kwargs: dict | None = None, limit: int = 160) -> str:
    """`os.system('touch /tmp/x')`: what a payload would have done, shortened for one line."""
    out = _Renderer(limit)
    out.put(qualname)
    out.call(args, kwargs or {}, 0)
    return out.text()


def _render_arg(value: Any, limit: int = 160) -> str:
    out = _Renderer(limit)
    out.value(value, 0)
    return out.text()


class _Renderer:
    """Python-like text for recorded calls. Work is bounded by `limit` (every value writes at
    least one character and rendering stops once the text is full), so shared sub-objects or
    huge containers in a hostile pickle cannot make it slow."""

    MAX_DEPTH = 8

    def __init__(self, limit: int):
        self.parts: list[str] = []
        self.size = 0
        self.limit = limit

    def put(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)

    def full(self) -> bool:
        return self.size > self.limit

    def text(self) -> str:
        text = "".join(self.parts)
        return text if len(text) <= self.limit else text[: self.limit - 4] + "...)"

    def value(self, value: Any, depth: int) -> None:
        if self.full():
            return
        if depth > self.MAX_DEPTH:
            self.put("...")
        elif isinstance(value, Inert):
            if value.callee is not None:
                self.value(value.callee, depth + 1)
            else:
                self.put(value.qualname)
            if value.args or value.kwargs or value.callee is not None:
                self.call(value.args, value.kwargs, depth)
            if value.state is not None and value.callee is None:
                self.put(".__setstate__(")
                self.value(value.state, depth + 1)
                self.put(")")
        elif isinstance(value, type) and issubclass(value, Inert):
            self.put(value._global.qualname)
        elif isinstance(value, (tuple, list)):
            tuple_ = isinstance(value, tuple)
            self.put("(" if tuple_ else "[")
            self.items(value, depth)
            self.put(",)" if tuple_ and len(value) == 1 else ")" if tuple_ else "]")
        elif isinstance(value, dict):
            self.put("{")
            for i, (k, v) in enumerate(value.items()):
                if i:
                    self.put(", ")
                if self.full():
                    self.put("...")
                    break
                self.value(k, depth + 1)
                self.put(": ")
                self.value(v, depth + 1)
            self.put("}")
        else:
            self.put(_short(value, 120))

    def items(self, values: Any, depth: int) -> None:
        for i, v in enumerate(values):
            if i:
                self.put(", ")
            if self.full():
                self.put("...")
                return
            self.value(v, depth + 1)

    def call(self, args: tuple, kwargs: dict, depth: int) -> None:
        self.put("(")
        self.items(args, depth)
        for i, (k, v) in enumerate(kwargs.items()):
            if args or i:
                self.put(", ")
            if self.full():
                self.put("...")
                break
            self.put(f"{k}=")
            self.value(v, depth + 1)
        self.put(")")


def safe_load(
    data: bytes | memoryview,
    *,
    source: str,
    persistent_load: Callable[[Any], Any] | None = None,
    known_schema: Callable[[str, str], bool] | None = None,
    start: int = 0,
) -> tuple[Any, list[GlobalRef], int]:
    """Unpickle one pickle from `data[start:]` safely: (object, globals it named, end offset).

    A pickle that fails still tells what a real load would have done before failing (pickle.load
    runs every opcode up to the bad one: the nullifAI technique). The raised error carries those
    globals as `pickle_globals`, and its line says what the dangerous ones would call."""
    try:
        end = scan_pickle(data, start, source)
    except UnsafePickleError as exc:
        offset = getattr(exc, "offset", None)
        named = getattr(exc, "names_globals", True)
        _attach(exc, run_prefix(data, start, offset, source) if offset is not None and named else [])
        _remember_failure(data, start, exc)
        raise
    unpickler = SafeUnpickler(
        data[start:end], source=source, persistent_load=persistent_load, known_schema=known_schema
    )
    outer = getattr(_hash_budget, "left", None)
    _hash_budget.left = MAX_HASHED_KEYS
    try:
        with collect_refused_builds() as refused:
            obj = unpickler.load()
    except UnsafePickleError as exc:
        if not exc.message.startswith(source):
            exc.message = f"{source}: {exc.message}"
        exc.hint = exc.hint or DAMAGED
        _attach(exc, unpickler.globals.values())
        raise
    except RecursionError as exc:
        raise _attach(UnsafePickleError(f"{source}: pickle nests too deeply", hint=CRAFTED), unpickler.globals.values()) from exc
    except MemoryError as exc:
        raise _attach(
            UnsafePickleError(f"{source}: pickle asks for more memory than it can hold", hint=CRAFTED), unpickler.globals.values()
        ) from exc
    except MscopeError as exc:
        exc.hint = exc.hint or DAMAGED
        _attach(exc, unpickler.globals.values())
        raise
    except Exception as exc:  # a malformed pickle can raise almost anything from the C unpickler
        # The C unpickler's own words are about the pickle; anything else came from our inert
        # stand-ins and would only confuse (`Inert.__setstate__() missing 1 required ...`).
        if isinstance(exc, pickle.UnpicklingError):
            detail = f" ({' '.join(str(exc).split())[:100]})"
        else:
            detail = f": its objects cannot be built ({type(exc).__name__})"
        raise _attach(
            UnsafePickleError(f"{source}: malformed pickle{detail}", hint=DAMAGED), unpickler.globals.values()
        ) from exc
    finally:
        _hash_budget.left = outer
    if unpickler.tampered:
        names = ", ".join(".".join(k) for k in unpickler.tampered[:2])
        raise _attach(
            UnsafePickleError(f"{source}: the pickle overwrites {names} (tampering with module state: an attack)", hint=CRAFTED),
            unpickler.globals.values(),
        )
    return obj, [*unpickler.globals.values(), *refused_build_refs(refused, source)], end


def _attach(exc: MscopeError, refs: Any) -> MscopeError:
    """Give a pickle error the globals the pickle reached, and say what the dangerous ones call."""
    refs = list(refs)
    exc.pickle_globals = refs  # type: ignore[attr-defined]
    exc.message += would_call(refs)
    return exc


def would_call(refs: Any) -> str:
    """`; before that it would call os.system('touch x')` for the dangerous globals, or ""."""
    calls = [c for r in refs if r.safety == "dangerous" for c in (r.calls or [r.qualname])]
    if not calls:
        return ""
    more = f" and {len(calls) - 2} more" if len(calls) > 2 else ""
    return f"; a real load would call {', '.join(calls[:2])}{more}"


MAX_PREFIX_BYTES = 64 << 20  # a broken pickle's valid part is copied to run it; payloads are small


def run_prefix(data: bytes | memoryview, start: int, offset: int, source: str) -> list[GlobalRef]:
    """The globals a real load of `data[start:]` reaches before it fails at `offset` (where the
    exact scan stopped): the valid opcodes, closed with STOP, go through the same scan (lengths,
    memo, cost, depth) and the same unpickler, whose error is then beside the point."""
    for _ in range(4):
        if offset <= start or offset - start > MAX_PREFIX_BYTES:
            return []
        chunk = bytes(data[start:offset]) + b"."
        try:
            scan_exact(chunk, 0, source)
            break
        except UnsafePickleError as exc:  # e.g. a memo index too large for the shorter pickle
            cut = getattr(exc, "offset", None)
            if cut is None or start + cut >= offset:
                return []
            offset = start + cut
    else:
        return []
    unpickler = SafeUnpickler(chunk, source=source, persistent_load=_any_persistent_id)
    try:
        unpickler.load()
    except Exception:  # noqa: BLE001 - expected: the prefix of a broken pickle rarely builds
        pass
    return list(unpickler.globals.values())


def _any_persistent_id(pid: Any) -> None:
    return None


# The payload search (readers/payloads.py) scans what a reader just refused: the same bytes. A
# refusal's globals are kept under a digest of the bytes, so the second look costs a hash, not
# another scan (a 2 MB object flood took four exact scans, about 5 s).
_FAILED_SCANS: dict[bytes, list[GlobalRef]] = {}
MAX_REMEMBERED_BYTES = 64 << 20


def _scan_key(data: bytes | memoryview, start: int) -> bytes | None:
    if len(data) - start > MAX_REMEMBERED_BYTES:
        return None
    from _blake2 import blake2b  # the builtin: hashlib would load OpenSSL on every command

    return blake2b(memoryview(data)[start:], digest_size=20).digest()


def _remember_failure(data: bytes | memoryview, start: int, exc: MscopeError) -> None:
    key = _scan_key(data, start)
    if key is None:
        return
    if len(_FAILED_SCANS) >= 8:
        _FAILED_SCANS.pop(next(iter(_FAILED_SCANS)))
    _FAILED_SCANS[key] = list(getattr(exc, "pickle_globals", ()))


def reachable_globals(data: bytes | memoryview, *, source: str, start: int = 0) -> tuple[list[GlobalRef], int | None]:
    """What loading the pickle at `data[start:]` would name and call, whatever follows: (globals,
    end offset, or None when the pickle is broken). For pickles outside a checkpoint's layout."""
    key = _scan_key(data, start)
    if key is not None and key in _FAILED_SCANS:
        return list(_FAILED_SCANS[key]), None
    try:
        _, refs, end = safe_load(data, source=source, persistent_load=_any_persistent_id, start=start)
    except MscopeError as exc:
        # The error's frames link back to our callers (an archive, 100k directory entries):
        # a cycle that outlives a gc-disabled command unless we cut it here.
        link: BaseException | None = exc
        for _ in range(8):
            if link is None:
                break
            link.__traceback__ = None
            link = link.__cause__ or link.__context__
        return list(getattr(exc, "pickle_globals", ())), None
    return refs, end
