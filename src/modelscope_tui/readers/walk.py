"""Turn an unpickled object graph (data + inert records) into a Checkpoint's records.

Finds the model part of a training checkpoint, reads full-module pickles as a real module tree,
and lists everything else as sections of tensors and plain entries.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from ..checkpoint import (
    BUFFER,
    DTYPE_ITEMSIZE,
    MAX_NAME_CHARS,
    PARAMETER,
    TENSOR,
    Checkpoint,
    Entry,
    ModuleNode,
    StorageRecord,
    TensorRecord,
    infer_kind,
    join_name,
)
from .pickle.unpickler import Device, DType, Inert, StorageType, TensorRef

MODEL_KEYS = (
    "state_dict",
    "model_state_dict",
    "model_state",
    "model",
    "module",
    "net",
    "network",
    "model_ema",
    "ema",
    "ema_model",
    "weights",
    "params",
)
MAX_ENTRIES = 20_000
MAX_DEPTH = 200


def section_role(key: str) -> str:
    k = key.lower()
    if "optim" in k:
        return "optimizer"
    if "sched" in k:
        return "scheduler"
    if k in ("hyper_parameters", "hparams", "hyperparameters", "config", "cfg", "args", "opt", "options", "hparams_name"):
        return "hyper_parameters"
    if "ema" in k:
        return "ema"
    if k in ("epoch", "step", "global_step", "iteration", "iter", "best_acc", "best_loss"):
        return "progress"
    return "other"


def is_module_object(obj: Any) -> bool:
    if not isinstance(obj, Inert):
        return False
    state = obj.state_dict()
    return state is not None and "_modules" in state and "_parameters" in state


def is_mapping(obj: Any) -> bool:
    return isinstance(obj, dict) or (isinstance(obj, Inert) and obj.items is not None and obj.state is None)


def mapping_items(obj: Any) -> list[tuple[Any, Any]]:
    if isinstance(obj, dict):
        return list(obj.items())
    if isinstance(obj, Inert) and obj.items is not None:
        return list(obj.items.items())
    return []


def tensor_leaves(obj: Any, limit: int = 1_000_000) -> tuple[int, int]:
    """(tensor leaves, non-tensor leaves) of a nested dict, without recursion."""
    tensors = others = 0
    stack = [(obj, 0)]
    seen: set[int] = set()
    while stack:
        item, depth = stack.pop()
        if type(item) in (dict, OrderedDict) and depth < MAX_DEPTH and id(item) not in seen:
            seen.add(id(item))  # a state_dict: count its tensors without a stack round trip each
            for value in item.values():
                if type(value) is TensorRef:
                    tensors += 1
                else:
                    stack.append((value, depth + 1))
        elif isinstance(item, TensorRef):
            tensors += 1
        elif is_mapping(item) and depth < MAX_DEPTH and id(item) not in seen:
            seen.add(id(item))
            stack.extend((v, depth + 1) for _, v in mapping_items(item))
        else:
            others += 1
        if tensors + others > limit:
            break
    return tensors, others


def looks_like_state_dict(obj: Any) -> bool:
    if is_module_object(obj):
        return True
    if not is_mapping(obj):
        return False
    tensors, others = tensor_leaves(obj)
    return tensors > 0 and others <= max(2, tensors // 10)


def find_model(root: Any) -> tuple[str, str]:
    """(kind, path of the model section) for an unpickled root object."""
    if is_module_object(root):
        return "full_module", ""
    if not is_mapping(root):
        return "object", ""
    if type(root) in (dict, OrderedDict) and set(map(type, root)) <= {str}:
        items = root  # a state_dict's own keys: no 100k-entry copy
    else:
        items = {key_text(k): v for k, v in mapping_items(root)}
    if "state_dict" in items and ({"pytorch-lightning_version", "optimizer_states", "global_step"} & items.keys()):
        return "lightning", "state_dict"
    tensors, others = tensor_leaves(root)
    if tensors and others <= max(2, tensors // 10) and not (items.keys() & set(MODEL_KEYS)):
        return "state_dict", ""
    for key in MODEL_KEYS:
        if key in items and looks_like_state_dict(items[key]):
            kind = "full_module" if is_module_object(items[key]) else "state_dict"
            return ("training_checkpoint" if len(items) > 1 else kind), key
    best, best_count = None, 0
    for key, value in items.items():
        if is_mapping(value) and section_role(key) not in ("optimizer", "scheduler"):
            count = tensor_leaves(value)[0]
            if count > best_count:
                best, best_count = key, count
    if best is not None and best_count >= max(1, tensors // 2):
        return "training_checkpoint", best
    return ("state_dict" if tensors else "object"), ""


class Walker:
    """Collects tensor records and entries into `ckpt` (one pass, no recursion)."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.entry_overflow = 0
        self._append_tensor = ckpt.tensors.append

    # -- public --------------------------------------------------------------------------------
    def walk_root(self, root: Any) -> None:
        kind, model_path = find_model(root)
        ckpt = self.ckpt
        ckpt.kind = kind
        ckpt.model_path = model_path
        if kind == "object" and not is_mapping(root):
            self.walk_value(root, "", section="")
            return
        if model_path == "":
            self.walk_model(root)
            return
        for key, value in mapping_items(root):
            key = join_name("", key_text(key))
            if key == model_path:
                ckpt.sections[key] = "model"
                self.walk_model(value)
            else:
                ckpt.sections[key] = section_role(key)
                self.walk_value(value, key, section=key)
        if self.entry_overflow:
            ckpt.warnings.append(f"{self.entry_overflow:,} more non-tensor entries not listed")

    def walk_model(self, obj: Any) -> None:
        if is_module_object(obj):
            self.ckpt.module_root = self.walk_module(obj)
            if self.ckpt.kind == "state_dict":
                self.ckpt.kind = "full_module"
        else:
            self.walk_value(obj, "", section="")

    # -- plain containers ----------------------------------------------------------------------
    def walk_value(self, obj: Any, path: str, section: str) -> None:
        """Tensors become records (named relative to `section`), everything else entries."""
        prefix_len = len(section) + 1 if section else 0
        stack: list[tuple[Any, str, int]] = [(obj, path, 0)]
        seen: set[int] = set()
        add_tensor = self.add_tensor
        while stack:
            item, where, depth = stack.pop()
            if type(item) in (dict, OrderedDict) and depth < MAX_DEPTH:
                # Fast path for state dicts: tensors added in place, only containers pushed.
                if id(item) in seen:
                    self.add_entry(where, "reference", "<refers back to an enclosing object>")
                    continue
                seen.add(id(item))
                if not item and where:
                    self.add_entry(where, "dict", "{}")
                pending = []
                for key, value in item.items():
                    if type(key) is not str:
                        key = key_text(key)
                    child = join_name(where, key) if where or len(key) > MAX_NAME_CHARS else key
                    if type(value) is TensorRef:
                        add_tensor(value, child[prefix_len:] if section else child, section)
                    else:
                        pending.append((value, child, depth + 1))
                stack.extend(reversed(pending))
                continue
            if isinstance(item, TensorRef):
                self.add_tensor(item, where[prefix_len:] if section else where, section)
                continue
            if depth >= MAX_DEPTH:
                self.add_entry(where, "nested", "<nested too deeply>")
                continue
            if isinstance(item, (dict, list, tuple, Inert)) and not isinstance(item, (DType, Device)):
                if id(item) in seen:
                    self.add_entry(where, "reference", "<refers back to an enclosing object>")
                    continue
                seen.add(id(item))
            children = list(self.children(item, where))
            if children is None or not children:
                if not (isinstance(item, (dict, list, tuple)) and where == "" and not children):
                    self.add_entry(where, *self.describe(item))
                continue
            if isinstance(item, Inert):
                self.add_entry(where, item.qualname, render_inert(item))
            stack.extend((child, child_path, depth + 1) for child_path, child in reversed(children))

    def children(self, item: Any, where: str) -> Iterator[tuple[str, Any]]:
        join = (lambda k: join_name(where, key_text(k))) if where else (lambda k: join_name("", key_text(k)))
        if is_mapping(item):
            for k, v in mapping_items(item):
                yield join(k), v
        elif isinstance(item, (list, tuple)) and not isinstance(item, (DType, Device)):
            if not any(isinstance(v, (TensorRef, dict, list, tuple, Inert)) for v in item):
                return  # a list of plain values is one entry
            for i, v in enumerate(item):
                yield join(i), v
        elif isinstance(item, Inert):
            state = item.state_dict()
            if state is not None:
                for k, v in state.items():
                    yield join(k), v
            if item.listitems:
                for i, v in enumerate(item.listitems):
                    yield join(i), v

    def describe(self, value: Any) -> tuple[str, Any]:
        if isinstance(value, int) and not small_int(value):
            return "int", f"<{value.bit_length():,}-bit integer>"
        if value is None or isinstance(value, (bool, int, float)):
            return type(value).__name__, value
        if isinstance(value, (DType, Device)):
            return type(value).__name__.lower(), str(value)
        if isinstance(value, str):
            return "str", value if len(value) <= 200 else value[:197] + "..."
        if isinstance(value, (bytes, bytearray)):
            return "bytes", f"<{len(value):,} bytes>"
        if isinstance(value, (list, tuple, set, frozenset)):
            return type(value).__name__, render_plain(value)
        if isinstance(value, Inert):
            return value.qualname, render_inert(value)
        if isinstance(value, StorageType):
            return "storage_type", repr(value)
        return type(value).__name__, render_plain(value)

    def add_entry(self, path: str, type_name: str, value: Any) -> None:
        if len(self.ckpt.entries) >= MAX_ENTRIES:
            self.entry_overflow += 1
            return
        self.ckpt.entries.append(Entry(path, type_name, value))

    # -- tensors -------------------------------------------------------------------------------
    def add_tensor(self, ref: TensorRef, name: str, section: str, kind: str | None = None, from_file: bool = False) -> TensorRecord:
        storage = ref.storage if isinstance(ref.storage, StorageRecord) else None
        dtype = ref.dtype or (storage.dtype if storage else "uint8")
        if kind is None:
            if ref.is_parameter:
                kind, from_file = PARAMETER, True
            elif section == "":
                kind = infer_kind(name, dtype)
                if ref.requires_grad and kind == PARAMETER:
                    from_file = True
            else:
                kind = TENSOR
        note = ref.note or (f"subclass {ref.subclass}" if ref.subclass else None)
        if ref.name is None:  # first reference: the ref becomes the record
            record = ref
            record.name = name
            record.storage = storage
            record.dtype = dtype
            record.kind = kind
            record.kind_from_file = from_file
            record.section = section
            record.shard = None
            record.persistent = True
            record.note = note
            record.tied_to = None
            record.alias_of = None
            record.nbytes = ref.numel * DTYPE_ITEMSIZE.get(dtype, 1)  # TensorRef counted numel
        else:  # the pickle refers to one tensor twice (tied parameters of a full module)
            # Positional: keyword arguments double the cost of this call.
            record = TensorRecord(
                name,
                ref.shape,
                dtype,
                ref.stride,
                ref.storage_offset,
                storage,
                ref.requires_grad,
                kind,
                from_file,
                section,
                None,  # shard
                True,  # persistent
                note,
                None,  # tied_to
                None,  # alias_of
                ref.pickle_seq,
            )
        self._append_tensor(record)
        return record

    # -- nn.Module pickles ---------------------------------------------------------------------
    def walk_module(self, root_obj: Inert) -> ModuleNode:
        root = ModuleNode("")
        stack: list[tuple[Inert, ModuleNode, int]] = [(root_obj, root, 0)]
        seen: set[int] = set()
        while stack:
            obj, node, depth = stack.pop()
            state = obj.state_dict() or {}
            node.class_path = obj.qualname
            training = state.get("training")
            node.training = training if isinstance(training, bool) else None
            non_persistent = state.get("_non_persistent_buffers_set") or ()
            for pname, ref in mapping_items(state.get("_parameters") or {}):
                if isinstance(ref, TensorRef):
                    rec = self.add_tensor(ref, join_name(node.name, key_text(pname)), "", PARAMETER, True)
                    node.tensors.append(rec)
            for bname, ref in mapping_items(state.get("_buffers") or {}):
                if isinstance(ref, TensorRef):
                    rec = self.add_tensor(ref, join_name(node.name, key_text(bname)), "", BUFFER, True)
                    rec.persistent = bname not in non_persistent if isinstance(non_persistent, (set, frozenset, list)) else True
                    node.tensors.append(rec)
            for key, value in state.items():
                if not isinstance(key, str) or key.startswith("_") or key == "training":
                    continue
                if isinstance(value, TensorRef):
                    node.tensors.append(self.add_tensor(value, join_name(node.name, key), "", TENSOR, True))
                elif is_plain(value):
                    node.attributes[key] = value if not isinstance(value, str) or len(value) < 200 else value[:197] + "..."
                else:
                    node.attributes[key] = self.describe(value)[1]
            children = []
            for cname, child in mapping_items(state.get("_modules") or {}):
                if isinstance(child, Inert) and id(child) not in seen and depth < MAX_DEPTH:
                    seen.add(id(child))
                    children.append((child, node.child(key_text(cname)), depth + 1))
                elif child is not None:
                    node.attributes[f"<module {key_text(cname)}>"] = "shared with another module" if id(child) in seen else self.describe(child)[1]
            stack.extend(reversed(children))
        return root


def key_text(key: Any) -> str:
    """A dict key as part of a name. Keys are strings in real files; anything else is rendered
    briefly and safely (a tuple key nested 100,000 deep must not raise RecursionError)."""
    if type(key) is str:
        return key
    if key is None or isinstance(key, (bool, float, str)) or (isinstance(key, int) and small_int(key)):
        return str(key)
    return render_plain(key, 80)


def small_int(value: int) -> bool:
    """Python refuses to print ints over 4,300 digits (ValueError); a pickle can hold any."""
    return value.bit_length() <= 256


def is_plain(value: Any) -> bool:
    if isinstance(value, int):
        return small_int(value)
    if value is None or isinstance(value, (float, str)):
        return True
    if isinstance(value, (tuple, list)) and len(value) <= 8:
        return all(v is None or isinstance(v, (float, str)) or (isinstance(v, int) and small_int(v)) for v in value)
    return False


def render_plain(value: Any, limit: int = 120) -> str:
    try:
        if isinstance(value, (list, tuple, set, frozenset)) and len(value) > 8:
            head = ", ".join(_brief(v) for v in list(value)[:6])
            text = f"[{head}, ... ({len(value):,} items)]"
        else:
            text = repr(value) if not isinstance(value, (list, tuple)) else "[" + ", ".join(_brief(v) for v in value) + "]"
    except RecursionError:
        text = "<recursive>"
    except ValueError:  # an int too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _brief(value: Any) -> str:
    if isinstance(value, int) and not small_int(value):
        return f"<{value.bit_length():,}-bit integer>"
    if isinstance(value, TensorRef):
        return f"tensor{list(value.shape)}"
    if isinstance(value, Inert):
        return value.qualname
    if isinstance(value, (list, tuple, dict)):
        return f"<{type(value).__name__} of {len(value)}>"
    if isinstance(value, (str, bytes, bytearray)) and len(value) > 40:
        value = value[:40]
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 40 else text[:37] + "..."


_NUMPY_SCALAR_FORMATS = {"f8": "d", "f4": "f", "f2": "e", "i8": "q", "i4": "i", "i2": "h", "i1": "b", "u8": "Q", "u4": "I", "u2": "H", "u1": "B", "b1": "?"}


def render_inert(obj: Inert) -> str:
    """A short rendering: numpy scalars as their value, other objects as Class(args/attrs)."""
    name = obj.qualname
    if name.endswith("multiarray.scalar") and len(obj.args) == 2 and isinstance(obj.args[1], bytes):
        value = numpy_scalar(obj.args[0], obj.args[1])
        if value is not None:
            return repr(value)
    state = obj.state_dict()
    if state:
        inner = ", ".join(f"{k}={_brief(v)}" for k, v in list(state.items())[:6])
        more = ", ..." if len(state) > 6 else ""
        return f"{name}({inner}{more})"
    if obj.args:
        return f"{name}({', '.join(_brief(a) for a in obj.args[:4])})"
    return name


def numpy_scalar(dtype: Any, raw: bytes) -> Any:
    if not isinstance(dtype, Inert) or not dtype.args or not isinstance(dtype.args[0], str):
        return None
    code = dtype.args[0]
    fmt = _NUMPY_SCALAR_FORMATS.get(code)
    if fmt is None or struct.calcsize(fmt) != len(raw):
        return None
    order = ">" if isinstance(dtype.state, tuple) and len(dtype.state) > 1 and dtype.state[1] == ">" else "<"
    return struct.unpack(order + fmt, raw)[0]
