"""The one mutable state behind the explorer: which parameters train, and the undo history.

Pure Python: every UI action is a method here, so tests need no terminal. Names are model tensor
names (what `load_state_dict` uses). Tied parameters (one storage under two names) are one
Parameter in the model, so they freeze and unfreeze together.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from itertools import compress

from ..checkpoint import (
    PARAMETER,
    Checkpoint,
    ModuleNode,
    TensorRecord,
    block_index,
    can_require_grad,
)
from ..enums import StrEnum
from ..errors import MscopeError
from ..patterns import PatternError, compile_safe_regex, glob_matches, search_names
from ..units import count_pair, percent

NORM_WITH_RUNNING_STATS = ("BatchNorm", "SyncBatchNorm", "InstanceNorm")
BLOCK_CONTAINERS = ("layers", "layer", "h", "blocks", "block", "encoder.layer", "decoder.layers", "transformer.h", "model.layers", "resblocks")
NO_BLOCKS_HINT = (
    "repeated blocks are 2 or more numbered modules (layers.0, layers.1, ...) of one class "
    "with the same parameter names, shapes and dtypes"
)


class SessionError(MscopeError):
    """A request the session cannot honour (bad pattern, nothing to undo...)."""


class Action(StrEnum):
    """What a rule did; a plan file stores the value (plan.py)."""

    FREEZE = "freeze"
    UNFREEZE = "unfreeze"
    INVERT = "invert"
    RESTORE = "restore"  # the state of another plan, loaded as one step


class Selector(StrEnum):
    """How a rule chose its tensors; a plan file stores the value."""

    NAMES = "names"
    GLOB = "glob"
    REGEX = "regex"
    CLASS = "class"
    ALL = "all"
    INVERT = "invert"
    LAST_N_BLOCKS = "last_n_blocks"
    PLAN = "plan"


class NodeState(StrEnum):
    """A module's parameters taken together (Session.node_state)."""

    TRAINABLE = "trainable"
    FROZEN = "frozen"
    MIXED = "mixed"
    LORA = "lora"  # quantized weights chosen as LoRA targets, nothing trained whole



# node_state runs for every painted row; an Enum class attribute costs ~90 ns on Python 3.11.
_TRAINABLE, _FROZEN, _MIXED, _LORA = NodeState.TRAINABLE, NodeState.FROZEN, NodeState.MIXED, NodeState.LORA


@dataclass(slots=True)
class Rule:
    """One user decision, kept in order for the freeze plan."""

    action: Action
    selector: Selector
    value: str = ""  # the pattern, class name, or "prefix:N"
    count: int = 0  # tensors it changed when applied

    def describe(self) -> str:
        target = {Selector.ALL: "everything", Selector.INVERT: "inverted"}.get(self.selector, f"{self.selector} {self.value}")
        return f"{self.action} {target}".strip()


@dataclass(slots=True)
class Change:
    description: str
    names: list[str]
    before: list[bool]
    after: list[bool]
    rule: Rule | None
    eval_before: frozenset[str] = frozenset()
    eval_after: frozenset[str] = frozenset()


@dataclass(slots=True)
class ChangeResult:
    changed: int
    matched: int
    skipped_untrainable: list[str] = field(default_factory=list)
    message: str = ""


@dataclass(slots=True)
class BlockGroup:
    """Repeated blocks detected from names: `prefix.0 ... prefix.{count-1}`."""

    prefix: str
    indices: list[int]

    @property
    def count(self) -> int:
        return len(self.indices)


@dataclass(slots=True)
class Preview:
    tensors: int
    parameters: int
    untrainable: int  # integer/bool tensors the pattern hits; they stay untouched
    names: list[str]


class Session:
    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.records: dict[str, TensorRecord] = {t.name: t for t in ckpt.model_tensors}
        # Parameters that can train, by canonical name (aliases resolve to the first name).
        self.canonical: dict[str, str] = {}
        self.trainable: dict[str, bool] = {}
        # A quantized weight never trains (its base is frozen), but "unfreezing" it says what a
        # QLoRA user means: put a LoRA adapter on it. That choice lives here, apart from
        # `trainable`, so the full fine-tune counts and estimates never include it.
        self.lora_targets: dict[str, bool] = {}
        for t in ckpt.model_tensors:
            if t.quant is not None and t.kind == PARAMETER:
                if t.quant.method != "gguf":  # llama.cpp's files serve; PEFT cannot wrap them
                    self.lora_targets[t.name] = False
                continue
            if t.kind != PARAMETER or not can_require_grad(t.dtype):
                continue
            canon = t.alias_of if t.alias_of and t.alias_of in self.records else t.name
            self.canonical[t.name] = canon
            if canon == t.name:
                self.trainable[t.name] = t.trainable
        self.initial = dict(self.trainable)
        self.eval_modules: set[str] = set()
        self.rules: list[Rule] = []
        self._undo: list[Change] = []
        self._redo: list[Change] = []
        self._saved_at = 0  # undo depth at the last save
        self._owner: dict[str, ModuleNode] = {}
        self._parent: dict[str, str | None] = {}
        self._nodes: dict[str, ModuleNode] = {}
        for node in ckpt.tree.walk():
            self._nodes[node.name] = node
            for child in node.children.values():
                self._parent[child.name] = node.name
            for t in node.tensors:
                self._owner[t.name] = node
        self._parent[""] = None
        # Counts per module are computed when asked (visible rows, the header) and cached per
        # generation: a change costs O(tensors changed), not O(modules touched x depth).
        self._generation = 0
        self._count_cache: dict[str, tuple[int, int]] = {}
        self._lora_cache: dict[str, tuple[int, tuple[int, int]]] = {}
        # module -> (its parameters' names, their numels, the ancestor with exactly these or None)
        self._subtree_params: dict[str, tuple[list[str], list[int], str | None]] = {}
        # dtype -> (names, numels) of every parameter that can train; built when first asked
        self._by_dtype: dict[str, tuple[list[str], list[int]]] | None = None
        self._by_dtype_count: tuple[int, dict[str, int]] = (-1, {})

    # -- queries -------------------------------------------------------------------------------
    def is_trainable(self, name: str) -> bool:
        canon = self.canonical.get(name)
        return canon is not None and self.trainable[canon]

    def can_train(self, name: str) -> bool:
        return name in self.canonical

    def is_lora_target(self, name: str) -> bool:
        """Whether a quantized weight was chosen for a LoRA adapter (it stays frozen itself)."""
        return self.lora_targets.get(name, False)

    def lora_target_count(self, node: ModuleNode | None = None) -> tuple[int, int]:
        """(quantized weights chosen as LoRA targets, quantized weights) under `node` (all)."""
        if not self.lora_targets:
            return 0, 0
        names = self.lora_targets if node is None else [t.name for t in node.all_tensors() if t.name in self.lora_targets]
        return sum(map(self.lora_targets.__getitem__, names)), len(names)

    @property
    def revision(self) -> int:
        """How many changes were applied (undo and redo count too): unchanged while the freeze
        state is, so a message about that state need not be repeated."""
        return self._generation

    @property
    def dirty(self) -> bool:
        return len(self._undo) != self._saved_at

    def mark_saved(self) -> None:
        self._saved_at = len(self._undo)

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def trainable_elements(self, names: list[str], numels: list[int]) -> int:
        """The elements that train now among canonical parameters `names` (of `numels`
        elements each): a C-speed loop, for counts over 100k tensors after every change."""
        return sum(compress(numels, map(self.trainable.__getitem__, names)))

    def trainable_by_dtype(self) -> dict[str, int]:
        """Trainable elements now per stored dtype (tied parameters once), one pass per change:
        the header's total and the fine-tune estimate both read it after every freeze."""
        generation, counts = self._by_dtype_count
        if generation == self._generation:
            return counts
        if self._by_dtype is None:
            groups: dict[str, tuple[list[str], list[int]]] = {}
            for name in self.trainable:
                t = self.records[name]
                names, numels = groups.setdefault(t.dtype, ([], []))
                names.append(name)
                numels.append(t.numel)
            self._by_dtype = groups
        counts = {dtype: self.trainable_elements(*group) for dtype, group in self._by_dtype.items()}
        self._by_dtype_count = (self._generation, counts)
        return counts

    def node(self, name: str) -> ModuleNode | None:
        return self._nodes.get(name)

    def subtree_names(self, node: ModuleNode) -> list[str]:
        return [t.name for t in node.all_tensors()]

    def trainable_in(self, node: ModuleNode) -> int:
        """Trainable parameter elements in the subtree (kept up to date incrementally)."""
        return self._count(node.name)

    def node_state(self, node: ModuleNode) -> NodeState | None:
        """The state of the module's parameters; None when it has none."""
        params = node.stats.params
        if self.lora_targets:
            chosen, quantized = self._lora_count(node.name)
            if chosen:
                trainable = self._count(node.name)
                return _LORA if not trainable and chosen == quantized else _MIXED
        if not params:
            # A module whose weights are all tied elsewhere (lm_head -> embed) follows them.
            tied = {self.canonical[t.name] for t in node.all_tensors() if t.name in self.canonical}
            if not tied:
                return None
            values = {self.trainable[c] for c in tied}
            return _MIXED if len(values) > 1 else _TRAINABLE if values.pop() else _FROZEN
        trainable = self._count(node.name)
        return _TRAINABLE if trainable == params else _FROZEN if trainable == 0 else _MIXED

    def totals(self) -> tuple[int, int]:
        """(trainable elements, all parameter elements), tied parameters counted once."""
        return self._count(""), self.ckpt.tree.stats.params

    def totals_line(self) -> str:
        """`trainable 1.6K / 2.2K (72.7%)`, the explorer header's rule: exact counts where the
        compact ones would hide a change (`1,594 / 1,610`), never 100.0% or 0.0% unless so."""
        trainable, total = self.totals()
        line = f"trainable {count_pair(trainable, total)} ({percent(trainable, total)})"
        lora = self.lora_line()
        return f"{line} · {lora}" if lora else line

    def lora_line(self) -> str:
        """`LoRA on 14/21 quantized`, or "" when no quantized weight is a LoRA target."""
        chosen, quantized = self.lora_target_count()
        return f"LoRA on {chosen}/{quantized} quantized" if chosen else ""

    # -- matching ------------------------------------------------------------------------------
    def match(self, pattern: str, kind: str = Selector.GLOB) -> list[str]:
        """Model tensor names matching a glob (`encoder.layers.[0-9].*`) or a regex (search)."""
        # A quantized weight's companions follow their weight: patterns select the weight.
        names = [n for n, t in self.records.items() if t.companion_of is None]
        if kind == Selector.REGEX:  # from the user or a plan file: shape-checked, time-bounded
            try:
                return search_names(compile_safe_regex(pattern), names)
            except PatternError as exc:
                raise SessionError(exc.message, hint=exc.hint) from None
        if kind != Selector.GLOB:
            raise SessionError(f"unknown pattern kind {kind!r}")
        return [n for n in names if glob_matches(n, pattern)]

    def preview(self, names: Iterable[str]) -> Preview:
        names = list(names)
        seen: set[str] = set()
        params = tensors = untrainable = 0
        for n in names:
            tensors += 1
            canon = self.canonical.get(n)
            if canon is None:
                untrainable += 1
            elif canon not in seen:
                seen.add(canon)
                params += self.records[canon].numel
        return Preview(tensors, params, untrainable, names)

    def classes(self) -> dict[str, int]:
        """Module class names in the file and how many modules have each."""
        counts: dict[str, int] = defaultdict(int)
        for node in self._nodes.values():
            if node.class_name and node.name:
                counts[node.class_name] += 1
        return dict(sorted(counts.items()))

    def modules_of_class(self, class_name: str) -> list[ModuleNode]:
        return [n for n in self._nodes.values() if n.name and class_name in (n.class_name, n.class_path)]

    def block_groups(self) -> list[BlockGroup]:
        """Repeated blocks (`layers.0..23`, `h.0..11`, `blocks.*`), the most likely first.

        A group is a module whose numbered children (at least 2) are all structurally alike: the
        same class (when the file stores classes), the same sub-modules, and the same tensor
        names, shapes, dtypes and kinds, with at least one parameter. A Sequential of mixed
        layers (conv, norm, activation, pooling) is not a group; a transformer's layers are.
        """
        return list(self._block_groups)

    @cached_property
    def _block_groups(self) -> list[BlockGroup]:
        found = []
        for node in self._nodes.values():
            if not node.name:  # a bare top-level Sequential: no prefix for a plan rule
                continue
            numbered = [(i, c) for k, c in node.children.items() if (i := block_index(k)) is not None]
            if len(numbered) < 2:
                continue
            first = _block_signature(numbered[0][1])
            if not first[2] or any(_block_signature(c) != first for _, c in numbered[1:]):
                continue
            found.append(BlockGroup(node.name, sorted(i for i, _ in numbered)))

        # Prefer well-known container names, then the group with the most parameters.
        def weight(g: BlockGroup) -> tuple[int, int]:
            node = self._nodes.get(g.prefix)
            known = any(g.prefix == c or g.prefix.endswith("." + c) for c in BLOCK_CONTAINERS)
            return (1 if known else 0, node.stats.params if node else 0)

        return sorted(found, key=weight, reverse=True)

    def frozen_norm_layers(self) -> list[str]:
        """Norm modules with running statistics whose parameters are all frozen.

        Freezing requires_grad does not stop BatchNorm from updating running_mean/var in train
        mode; these need eval mode to be truly frozen.
        """
        return [n.name for n in self._norm_modules if n.stats.params and self._count(n.name) == 0]

    @cached_property
    def _norm_modules(self) -> list[ModuleNode]:
        return [n for n in self._nodes.values() if n.name and _has_running_stats(n)]

    # -- changes -------------------------------------------------------------------------------
    def set_trainable(self, names: Iterable[str], value: bool, rule: Rule | None = None, description: str = "") -> ChangeResult:
        names = list(names)
        return self._set(names, list(map(self.canonical.get, names)), value, rule, description)

    def _set(
        self,
        names: list[str],
        canon: list[str | None],
        value: bool,
        rule: Rule | None,
        description: str = "",
        unique: dict[str, None] | None = None,
        all_flip: bool = False,
    ) -> ChangeResult:
        """set_trainable with `names` already mapped to their canonical names (None: cannot
        train); `unique`: those canonical names once each, when the caller has them;
        `all_flip`: the caller knows that none of them is at `value` yet."""
        trainable = self.trainable
        # C-level loops where it can: this runs on 100k-tensor subtrees
        skipped = [n for n, c in zip(names, canon) if c is None and n in self.records] if None in canon else []
        lora: list[str] = []
        if skipped and self.lora_targets:
            lora = [n for n in skipped if n in self.lora_targets and self.lora_targets[n] is not value]
            skipped = [n for n in skipped if n not in self.lora_targets and self.records[n].companion_of is None]
        if unique is None:
            unique = dict.fromkeys(canon)
            unique.pop(None, None)
        targets = list(unique) if all_flip else [c for c in unique if trainable[c] is not value]
        message = ""
        if skipped and not targets and not lora and len(skipped) == len(names):
            message = f"{_describe_skipped(self, skipped)}: cannot require grad; left as they are"
        if not targets and not lora:
            return ChangeResult(0, len(names), skipped, message or "nothing to change")
        if rule is not None:
            rule.count = len(targets) + len(lora)
        verb = "unfroze" if value else "froze"
        said = [f"{verb} {len(targets)} tensor(s)"] if targets else []
        if lora:
            said.append(f"{'chose' if value else 'dropped'} {len(lora)} quantized weight(s) as LoRA target(s)")
        change = Change(
            description or "; ".join(said),
            targets + lora,
            [not value] * (len(targets) + len(lora)),
            [value] * (len(targets) + len(lora)),
            rule,
        )
        self._apply(change, forward=True)
        self._undo.append(change)
        self._redo.clear()
        if skipped:
            message = f"{'; '.join(said)}; {_describe_skipped(self, skipped)} left as they are"
        elif lora and description:
            message = f"{description}: {'; '.join(said)}"
        return ChangeResult(len(targets) + len(lora), len(names), skipped, message or change.description)

    def freeze(self, names: Iterable[str], rule: Rule | None = None) -> ChangeResult:
        return self.set_trainable(names, False, rule or Rule(Action.FREEZE, Selector.NAMES))

    def unfreeze(self, names: Iterable[str], rule: Rule | None = None) -> ChangeResult:
        return self.set_trainable(names, True, rule or Rule(Action.UNFREEZE, Selector.NAMES))

    def toggle(self, names: Iterable[str]) -> ChangeResult:
        """Freeze if everything trainable among `names` trains now, else unfreeze them all."""
        names = list(names)
        canon = list(map(self.canonical.get, names))  # mapped and deduplicated once, for the change too
        unique = dict.fromkeys(canon)
        unique.pop(None, None)
        lora = [n for n in names if n in self.lora_targets] if self.lora_targets else []
        if not unique and not lora:
            return ChangeResult(0, len(names), names, "no trainable tensors here (integer, bool and quantized tensors cannot require grad)")
        # freezing: all of them train (or are LoRA targets) now
        value = not (all(map(self.trainable.__getitem__, unique)) and all(map(self.lora_targets.__getitem__, lora)))
        action = Action.UNFREEZE if value else Action.FREEZE
        rule = Rule(action, Selector.NAMES, _names_value(names))
        return self._set(names, canon, value, rule, unique=unique, all_flip=not value)

    def freeze_pattern(self, pattern: str, kind: str = Selector.GLOB, value: bool = False) -> ChangeResult:
        names = self.match(pattern, kind)  # refuses a kind other than glob or regex
        action = Action.UNFREEZE if value else Action.FREEZE
        return self.set_trainable(names, value, Rule(action, Selector(kind), pattern), f"{action} {kind} {pattern}")

    def freeze_class(self, class_name: str, value: bool = False) -> ChangeResult:
        names = [t.name for node in self.modules_of_class(class_name) for t in node.all_tensors()]
        action = Action.UNFREEZE if value else Action.FREEZE
        return self.set_trainable(names, value, Rule(action, Selector.CLASS, class_name), f"{action} every {class_name}")

    def freeze_all(self) -> ChangeResult:
        return self.set_trainable(list(self.records), False, Rule(Action.FREEZE, Selector.ALL), "freeze all")

    def unfreeze_all(self) -> ChangeResult:
        return self.set_trainable(list(self.records), True, Rule(Action.UNFREEZE, Selector.ALL), "unfreeze all")

    def invert(self) -> ChangeResult:
        names = list(self.trainable)
        if not names:
            return ChangeResult(0, 0, [], "no trainable parameters in this file")
        before = [self.trainable[n] for n in names]
        change = Change("invert", names, before, [not b for b in before], Rule(Action.INVERT, Selector.INVERT))
        change.rule.count = len(names)
        self._apply(change, forward=True)
        self._undo.append(change)
        self._redo.clear()
        return ChangeResult(len(names), len(names), [], f"inverted {len(names)} tensor(s)")

    def train_last_n_blocks(self, n: int, group: BlockGroup | None = None) -> ChangeResult:
        """Freeze the blocks of `group` except the last `n`; unfreeze those n. Others untouched."""
        groups = self.block_groups()
        if group is not None and all(g.prefix != group.prefix for g in groups):
            raise SessionError(f"{group.prefix} is not a group of repeated blocks", hint=NO_BLOCKS_HINT)
        group = group or (groups[0] if groups else None)
        if group is None:
            raise SessionError("no repeated blocks found", hint=NO_BLOCKS_HINT)
        if not 0 <= n <= group.count:
            raise SessionError(f"{group.prefix} has {group.count} blocks; choose 0..{group.count}")
        keep = set(group.indices[group.count - n :]) if n else set()
        names_freeze, names_train = [], []
        for idx in group.indices:
            node = self._nodes.get(f"{group.prefix}.{idx}")
            if node is None:
                continue
            (names_train if idx in keep else names_freeze).extend(t.name for t in node.all_tensors())
        before_names = [c for c in dict.fromkeys(self.canonical[n] for n in names_freeze + names_train if n in self.canonical)]
        # quantized weights of the kept blocks become LoRA targets, the others stop being ones
        before_names += [n for n in names_freeze + names_train if n in self.lora_targets]
        before = [self.trainable[c] if c in self.trainable else self.lora_targets[c] for c in before_names]
        train_set = {self.canonical[n] for n in names_train if n in self.canonical}
        train_set.update(n for n in names_train if n in self.lora_targets)
        after = [c in train_set for c in before_names]
        rule = Rule(Action.UNFREEZE, Selector.LAST_N_BLOCKS, f"{group.prefix}:{n}")
        change = Change(f"train only the last {n} of {group.prefix}", before_names, before, after, rule)
        rule.count = sum(1 for b, a in zip(before, after) if b != a)
        if not rule.count:
            return ChangeResult(0, len(before_names), [], "nothing to change")
        self._apply(change, forward=True)
        self._undo.append(change)
        self._redo.clear()
        return ChangeResult(rule.count, len(before_names), [], change.description)

    def set_eval_mode(self, modules: Iterable[str], value: bool = True) -> None:
        """Record 'eval mode' for norm layers in the plan (their running stats stay put)."""
        before = frozenset(self.eval_modules)
        after = set(before)
        after.update(modules) if value else after.difference_update(modules)
        unknown = [m for m in after - before if m not in self._nodes]
        if unknown:
            raise SessionError(f"no module named {unknown[0]!r} in this checkpoint")
        change = Change("eval mode for norm layers" if value else "train mode for norm layers", [], [], [], None, before, frozenset(after))
        self.push(change)

    def push(self, change: Change) -> None:
        """Apply a prepared change (mixed values allowed) as one undoable step."""
        if not change.names and change.eval_before == change.eval_after:
            return
        self._apply(change, forward=True)
        self._undo.append(change)
        self._redo.clear()

    def undo(self) -> str:
        if not self._undo:
            raise SessionError("nothing to undo")
        change = self._undo.pop()
        self._apply(change, forward=False)
        self._redo.append(change)
        return f"undid: {change.description}"

    def redo(self) -> str:
        if not self._redo:
            raise SessionError("nothing to redo")
        change = self._redo.pop()
        self._apply(change, forward=True)
        self._undo.append(change)
        return f"redid: {change.description}"

    def history(self) -> list[Rule]:
        """The rules in effect (undone ones excluded), in order: what a plan records."""
        return [c.rule for c in self._undo if c.rule is not None]

    # -- internals -----------------------------------------------------------------------------
    def _apply(self, change: Change, forward: bool) -> None:
        values = change.after if forward else change.before
        if self.lora_targets and any(n in self.lora_targets for n in change.names):
            for n, v in zip(change.names, values):
                (self.lora_targets if n in self.lora_targets else self.trainable)[n] = v
        else:
            self.trainable.update(zip(change.names, values))
        self._generation += 1
        if change.eval_before or change.eval_after:
            self.eval_modules = set(change.eval_after if forward else change.eval_before)

    def _count(self, module: str) -> int:
        """Trainable parameter elements under `module` now (tied parameters once)."""
        cached = self._count_cache.get(module)
        if cached is not None and cached[0] == self._generation:
            return cached[1]
        params = self._subtree_params.get(module)
        if params is None:
            node = self._nodes.get(module)
            tensors = [t for t in node.all_tensors() if t.name in self.trainable] if node is not None else []
            names = [t.name for t in tensors]
            # A module holding every parameter of its parent (`transformer` under the root,
            # `model.decoder` under `model`) has its parent's count: one pass over 100k names
            # after a change, not one per level. Only a parent counted before is looked at (the
            # tree shows parents first), so this never walks up a deep chain.
            parent = self._subtree_params.get(self._parent.get(module))
            same = (parent[2] or self._parent[module]) if parent is not None and len(parent[0]) == len(names) else None
            params = self._subtree_params[module] = (names, [t.numel for t in tensors], same)
        names, numels, same = params
        if same is not None:
            value = self._count(same)
        elif len(names) == len(self.trainable):  # every parameter (the root, or its one child)
            value = sum(self.trainable_by_dtype().values())
        else:
            value = self.trainable_elements(names, numels)
        self._count_cache[module] = (self._generation, value)
        return value

    def _lora_count(self, module: str) -> tuple[int, int]:
        """(chosen, all) quantized weights under `module`, cached per generation like _count."""
        key = "\0lora:" + module
        cached = self._lora_cache.get(key)
        if cached is not None and cached[0] == self._generation:
            return cached[1]
        node = self._nodes.get(module)
        value = self.lora_target_count(node) if node is not None else (0, 0)
        self._lora_cache[key] = (self._generation, value)
        return value


def _describe_skipped(session: Session, names: list[str]) -> str:
    """'3 buffer(s), 1 integer/bool tensor(s)': what a freeze request could not touch."""
    # a quantized weight's companions go with it (a module's names list both): said once, as the weight
    records = [t for t in (session.records[n] for n in names) if t.companion_of is None]
    quantized = sorted({t.quant.scheme for t in records if t.quant is not None})
    integer = sum(1 for t in records if t.quant is None and not can_require_grad(t.dtype))
    buffers = len(records) - integer - sum(1 for t in records if t.quant is not None)
    parts = []
    if quantized:
        count = sum(1 for t in records if t.quant is not None)
        parts.append(f"{count} quantized weight(s) ({', '.join(quantized[:3])}: a frozen base; train adapters on it)")
    if buffers:
        parts.append(f"{buffers} buffer(s)")
    if integer:
        parts.append(f"{integer} integer/bool tensor(s)")
    return ", ".join(parts)


def _block_signature(node: ModuleNode) -> tuple:
    """What makes two blocks alike: class and sub-modules (relative name, class) where the file
    stores classes, and parameters (relative name, shape, dtype); the last item is empty when the
    block has no parameter. Buffers may differ (a state_dict cannot tell a BatchNorm's extra
    running statistics from a different layer)."""
    base = len(node.name) + 1
    modules = tuple(sorted((n.name[base:], n.class_path or "") for n in node.walk() if n is not node))
    params = tuple(
        sorted((t.name[base:], tuple(t.shape), t.dtype) for t in node.all_tensors() if t.kind == PARAMETER)
    )
    return (node.class_path or "", modules, params)


def _has_running_stats(node: ModuleNode) -> bool:
    cls = node.class_name or ""
    if any(cls.startswith(prefix) for prefix in NORM_WITH_RUNNING_STATS):
        return True
    return any(t.name.endswith(".running_mean") for t in node.tensors)


def _names_value(names: list[str]) -> str:
    return ",".join(names) if len(names) <= 3 else f"{names[0]},... ({len(names)} tensors)"
