"""Propagate pass: shapes and dtypes of every node, from fake tensors.

An ``fx.Interpreter`` runs the captured graph under ``FakeTensorMode``: every parameter,
buffer and input is replaced by a fake tensor of the same shape, dtype and strides on the
CPU, so no weight is read and nothing the size of the model is allocated. A model built
under ``torch.device("meta")`` plans exactly like a real one. Each node's result is
written to ``node.meta["val"]`` (the convention torch.export uses); nothing else changes.

Tied parameters stay tied: one fake per distinct tensor object.

Repeated blocks
    Dispatching one operator to a fake tensor costs about half a millisecond, and a 96-layer
    transformer has thousands of them, nearly all in blocks that repeat. A *block* is a run
    of consecutive nodes called inside one element of an indexed container (``blocks.3``,
    :func:`~partc.passes.annotate.layer_key`). Two blocks whose nodes have the same targets,
    the same constants and the same argument structure (each argument a node of the block
    at the same position, or the k-th value the block reads from outside), and whose outside
    values (and parameters) have the same metadata (shape, stride, dtype, storage offset and
    size, device, which of them are the same object and which share storage) produce values
    of the same metadata, since fake tensors carry nothing else. So the first block of each
    kind runs; every later one of the same kind is rebuilt from a record of it
    (:class:`_BlockRecord`) without dispatching an operator: a tensor that owns its storage
    becomes a fresh fake of the same size and strides, a view of it a view of the new fake
    at the same offset, a view of an outside value a view of that value (so storage sharing
    is what the operators give), the same object where the record has the same object, and
    Python values (sizes) are copied as they are. Blocks that do anything the record cannot
    reproduce run as usual: a target that is not a torch operator or method (a user function
    could read state), a constant that is not a plain value, fakes that carry a constant or a
    gradient requirement, outputs whose storage starts before them, or an operator that
    changes the metadata of a value from outside. Rebuilt views are plain fakes that share
    their base's storage: ``_base`` is not set on them (nothing in partc reads it; aliasing is
    ``torch._C._is_alias_of``, storage and offsets are exact). ``memoize=False`` runs every node.
    The blocks of a graph are worked out once and kept on it until one of its nodes changes
    (the search propagates the same graph again at batch 1).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses import fake_tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

from partc.errors import TraceError
from partc.passes.annotate import layer_key
from partc.passes.ir import AttributeReader, error_context, gc_paused, owning_module


_CPU = torch.device("cpu")
_ASSERT_METADATA = getattr(torch.ops.aten, "_assert_tensor_metadata", None)
_ASSERT_METADATA = getattr(_ASSERT_METADATA, "default", None)

# Python values a record copies as they are (immutable, compared by type and repr).
_PLAIN_TYPES = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout, slice, type(Ellipsis))
# Modules of the call_function targets whose result depends only on their arguments.
_OPERATOR_MODULES = ("torch", "_operator", "operator", "math", "builtins", "_functools")


class _NotReplayable(Exception):
    """A block that must run operator by operator (see the module doc)."""


class _FakePropagator(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode, memoize: bool = True):
        super().__init__(gm, garbage_collect_values=False)  # every value is kept (self.values)
        self.mode = mode
        self._fake_of: dict[int, torch.Tensor] = {}
        self._meta_of: dict[int, torch.Tensor] = {}  # id(fake made here) -> the meta tensor it wraps
        self.values: dict[fx.Node, Any] = {}
        self._read = AttributeReader(gm)
        self._attributes: dict[str, Any] = {}  # get_attr target -> its fake (fake_attributes)
        self._blocks = _repeatable_blocks(gm) if memoize else {}
        self._records: dict[tuple, _BlockRecord | None] = {}  # (structure, outside metadata) -> record
        self._rebuilt: dict[fx.Node, Any] = {}  # values of the block being rebuilt
        self._recording: tuple[_Block, tuple, tuple] | None = None  # (block, key, outside values) being run for a record
        self.rebuilt_blocks = 0
        self._make_fake = _FakeMaker(mode)

    def wrap(self, meta: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A fake of ``meta`` (a meta tensor) on ``device``, without dispatching an operator."""
        fake = self._make_fake(meta, device)  # as the mode wraps its operators' results
        self._meta_of[id(fake)] = meta
        return fake

    def fake(self, value: Any) -> Any:
        """The fake of a tensor (one per tensor object); any other value as it is."""
        if not isinstance(value, torch.Tensor):
            return value
        key = id(value)
        if key not in self._fake_of:
            with unset_fake_temporarily():  # a meta tensor, not an operator dispatched to fakes
                self._fake_of[key] = self._new_fake(value)
        return self._fake_of[key]

    def _new_fake(self, value: torch.Tensor) -> torch.Tensor:
        meta = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
        return self.wrap(meta, _CPU)

    def fake_attributes(self, reused: dict[str, tuple[torch.Tensor, FakeTensor]] | None = None) -> None:
        """Make the fakes of the tensors that get_attr nodes read, all at once before the run:
        made in the run, each would step out of the fake mode and back (~20 us each). Each
        target is read once, here; get_attr and the blocks' outside values look it up.
        ``reused``: target -> (the tensor it reads, a fake of it to take instead of a new one)."""
        for target, (tensor, fake) in (reused or {}).items():
            self._attributes[target] = self._fake_of.setdefault(id(tensor), fake)
        with unset_fake_temporarily():
            for node in self.module.graph.nodes:
                if node.op != "get_attr" or node.target in self._attributes:
                    continue
                try:
                    value = self._read(node.target)
                except AttributeError:
                    continue  # the run says what is missing
                if isinstance(value, torch.Tensor) and id(value) not in self._fake_of:
                    self._fake_of[id(value)] = self._new_fake(value)
                self._attributes[node.target] = self.fake(value)

    def get_attr(self, target, args, kwargs):
        if target in self._attributes:
            return self._attributes[target]
        try:
            value = self._read(target)
        except AttributeError:
            value = super().get_attr(target, args, kwargs)  # fx's own error for a path it cannot read
        return self.fake(value)

    def call_function(self, target, args, kwargs):
        # torch.export writes the device it traced on into the graph (a rotary table moved
        # with .to(device) in an HF model on the meta device); every fake lives on the CPU.
        args, kwargs = pytree.tree_map_only(torch.device, lambda _: _CPU, (args, kwargs))
        return super().call_function(target, args, kwargs)

    def run_node(self, node: fx.Node) -> Any:
        block = self._blocks.get(node)
        if block is not None and block.nodes[0] is node:
            self._enter(block)
        if node in self._rebuilt:
            result = self._rebuilt.pop(node)
        else:
            result = self._run(node)
        self.values[node] = result
        if self._recording is not None and self._recording[0].nodes[-1] is node:
            self._finish_record()
        return result

    def _run(self, node: fx.Node) -> Any:
        if node.target is _ASSERT_METADATA:
            # export's checks pin the device it traced on (meta for a meta model); every
            # fake here lives on the CPU, and the dtype/shape facts are already in the graph.
            return None
        try:
            return super().run_node(node)
        except Exception as e:  # noqa: BLE001 - re-raised with the node that failed
            raise TraceError(
                f"shape propagation failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                error_context(
                    node,
                    "propagate",
                    fix="check that example_inputs have the shapes and dtypes forward() expects; "
                    "operators whose output shape depends on tensor values (nonzero, .item()) are not supported yet",
                ),
            ) from e

    # -- repeated blocks ---------------------------------------------------------------------------
    def _outside_values(self, block: "_Block") -> tuple:
        """What ``block`` reads from outside, in order: earlier nodes' values, then its parameters."""
        return tuple(self.values[n] for n in block.outside) + tuple(self.get_attr(n.target, (), {}) for n in block.attrs)

    def _enter(self, block: "_Block") -> None:
        outside = self._outside_values(block)
        try:
            key = (block.structure, _outside_metadata(outside))
        except _NotReplayable:
            return
        if key not in self._records:
            self._recording = (block, key, outside)  # run it, and record it after its last node
            return
        record = self._records[key]
        if record is not None:
            with unset_fake_temporarily():  # meta tensors only; the record's outside views enter the mode themselves
                self._rebuilt = dict(zip(block.nodes, record.rebuild(self, outside)))
            self.rebuilt_blocks += 1

    def _finish_record(self) -> None:
        block, key, outside = self._recording
        self._recording = None
        try:
            if _outside_metadata(outside) != key[1]:
                raise _NotReplayable("the block changed the metadata of a value from outside")
            self._records[key] = _BlockRecord.of([self.values[n] for n in block.nodes], outside)
        except _NotReplayable:
            self._records[key] = None


class _FakeMaker:
    """Makes the fake of a meta tensor that ``FakeTensor(mode, meta, device)`` makes, about
    four times quicker on the CPU device (3 us against 14: the constructor checks its
    keyword arguments and sets fifteen memo fields through their descriptors; a 96-layer
    GPT-3 plan makes ~5,000 fakes). The quick way makes the subclass tensor as the
    constructor does (dispatch keys of the fake device, data pointers refused or warned
    about as the mode says) and copies the fields of a fake the constructor made (the mode,
    the device, empty memos). It is taken only after it was checked, on a fake of each, to
    make a tensor of the same type, dispatch keys and device; on a difference, a torch
    without these calls or the fake-tensor debug mode, the constructor makes every fake."""

    def __init__(self, mode: FakeTensorMode):
        self.mode = mode
        self.quick: bool | None = None  # whether the quick way is taken (None: not checked yet)
        self._fields: dict[str, Any] = {}
        self._refuse_data_pointer: Any = None

    def __call__(self, meta: torch.Tensor, device: torch.device) -> FakeTensor:
        if self.quick is None:
            self.quick = self._check()
        if not self.quick or device != _CPU or meta.requires_grad:
            return FakeTensor(self.mode, meta, device)
        return self._quick(meta)

    def _quick(self, meta: torch.Tensor) -> FakeTensor:
        fake = torch.Tensor._make_subclass(FakeTensor, meta, False, dispatch_device=True, device_for_backend_keys=_CPU)
        self._refuse_data_pointer(fake)
        fake.__dict__.update(self._fields)
        return fake

    def _check(self) -> bool:
        unsafe = getattr(self.mode, "_allow_unsafe_data_ptr_access", False)
        self._refuse_data_pointer = getattr(torch._C, "_set_warn_deprecated_on_mutable_data_ptr" if unsafe else "_set_throw_on_mutable_data_ptr", None)
        if self._refuse_data_pointer is None or getattr(getattr(fake_tensor, "FakeTensorConfig", None), "debug", False):
            return False
        try:
            with unset_fake_temporarily():
                made = FakeTensor(self.mode, torch.empty(2, 3, device="meta"), _CPU)
                self._fields = dict(made.__dict__)
                quick = self._quick(torch.empty(2, 3, device="meta"))
        except Exception:  # noqa: BLE001 - a torch whose fakes this cannot make: the constructor makes them
            return False
        return type(quick) is type(made) and torch._C._dispatch_keys(quick) == torch._C._dispatch_keys(made) and quick.device == made.device


# -- blocks -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Block:
    nodes: tuple[fx.Node, ...]
    outside: tuple[fx.Node, ...]  # nodes before the block that it reads, in first-read order
    attrs: tuple[fx.Node, ...]  # its get_attr nodes (their fakes count as values from outside)
    structure: tuple  # targets, constants and argument structure; equal for identical blocks


# The attribute of an fx.Graph where _repeatable_blocks keeps its blocks, with the facts
# they were worked out from.
_BLOCKS_ATTRIBUTE = "_partc_repeatable_blocks"


def _repeatable_blocks(gm: fx.GraphModule) -> dict[fx.Node, _Block]:
    """Every node of a block that may repeat (two or more nodes, all describable) -> its block.

    Worked out once per graph (the search propagates the same graph again at batch 1): kept
    on ``gm.graph`` with what a block's replay depends on, each node's op, target and
    arguments (the same objects), in order, and worked out again when any of these changed.
    Module stacks only group the nodes into blocks (one per layer); a replay is exact for
    any run of nodes, so a stack changed since (no pass does) would cost reuse, not
    correctness, and is not kept (~15,000 tuples at 96 layers for the collector to walk)."""
    graph = gm.graph
    facts = _block_facts(graph)
    known = getattr(graph, _BLOCKS_ATTRIBUTE, None)
    if known is not None and _same_facts(known[0], facts):
        return known[1]
    blocks = _find_blocks(graph)
    setattr(graph, _BLOCKS_ATTRIBUTE, (facts, blocks))
    return blocks


def _block_facts(graph: fx.Graph) -> tuple[list, ...]:
    """The nodes, and their ops, targets, args and kwargs, in order: a list of each (five
    objects for the collector to walk, not one tuple per node)."""
    nodes = list(graph.nodes)
    return nodes, [n.op for n in nodes], [n.target for n in nodes], [n.args for n in nodes], [n.kwargs for n in nodes]


def _same_facts(known: tuple[list, ...], facts: tuple[list, ...]) -> bool:
    """Nodes, targets and arguments are compared as objects (1 and 1.0 are equal, not the same)."""
    nodes, ops, targets, args, kwargs = facts
    return (
        len(known[0]) == len(nodes)
        and known[1] == ops
        and all(map(operator.is_, known[0], nodes))
        and all(map(operator.is_, known[2], targets))
        and all(map(operator.is_, known[3], args))
        and all(map(operator.is_, known[4], kwargs))
    )


def _find_blocks(graph: fx.Graph) -> dict[fx.Node, _Block]:
    runs: list[list[fx.Node]] = []
    current = None
    for node in graph.nodes:
        key = layer_key(owning_module(node)[0]) if node.op not in ("placeholder", "output") else None
        if key is None or key != current:
            runs.append([])
        current = key
        if key is not None:
            runs[-1].append(node)
    blocks: dict[fx.Node, _Block] = {}
    for nodes in runs:
        if len(nodes) < 2:
            continue
        try:
            block = _describe_block(nodes)
        except _NotReplayable:
            continue
        for node in nodes:
            blocks[node] = block
    return blocks


def _describe_block(nodes: list[fx.Node]) -> _Block:
    attrs = [n for n in nodes if n.op == "get_attr"]
    inside = {n: ("node", i) for i, n in enumerate(nodes)}  # a get_attr: ("attr", k), the k-th of them
    inside.update((n, ("attr", k)) for k, n in enumerate(attrs))
    outside: dict[fx.Node, int] = {}

    def describe(arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            described = inside.get(arg)
            return described if described is not None else ("outside", outside.setdefault(arg, len(outside)))
        if isinstance(arg, (tuple, list)):
            return (type(arg).__name__, tuple([describe(a) for a in arg]))
        if isinstance(arg, dict):
            return ("dict", tuple([(k, describe(v)) for k, v in arg.items()]))
        if not isinstance(arg, _PLAIN_TYPES):
            raise _NotReplayable(f"constant of type {type(arg).__name__}")
        return (type(arg).__name__, repr(arg))

    structure = []
    for n in nodes:
        if n.op == "get_attr":
            structure.append(("get_attr",))
        elif n.op == "call_method" or (n.op == "call_function" and _is_operator(n.target)):
            structure.append((n.op, n.target, describe(n.args), describe(n.kwargs)))
        else:
            raise _NotReplayable(f"{n.op} {n.target!r}")
    return _Block(tuple(nodes), tuple(outside), tuple(attrs), tuple(structure))


def _is_operator(target: Any) -> bool:
    """A torch operator or function, or a Python builtin: its result depends only on its arguments."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return True
    module = getattr(target, "__module__", None) or ""
    return callable(target) and module.split(".")[0] in _OPERATOR_MODULES


# -- metadata of fakes --------------------------------------------------------------------------------
def _tensors(value: Any, found: list, keep: bool = False) -> Any:
    """``value`` with every tensor replaced by ("tensor", its index in ``found``), appending it;
    Python values as ("py", type name, repr), or ("py", the value) with ``keep``."""
    if isinstance(value, torch.Tensor):
        found.append(value)
        return ("tensor", len(found) - 1)
    if isinstance(value, torch.Size):
        return ("size", tuple(value))
    if type(value) in (tuple, list):
        return (type(value).__name__, tuple(_tensors(v, found, keep) for v in value))
    if isinstance(value, _PLAIN_TYPES):
        return ("py", value) if keep else ("py", type(value).__name__, repr(value))
    raise _NotReplayable(f"value of type {type(value).__name__}")


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _tensor_metadata(t: torch.Tensor) -> tuple:
    if getattr(t, "constant", None) is not None or t.requires_grad or not all(type(d) is int for d in (*t.shape, *t.stride())):
        raise _NotReplayable("a fake with a constant, a gradient or symbolic sizes")
    return (tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.device, t.untyped_storage().nbytes(), type(t))


def _outside_metadata(outside: tuple) -> tuple:
    """Everything about the values a block reads that its operators' results can depend on."""
    tensors: list[torch.Tensor] = []
    structure = tuple(_tensors(v, tensors) for v in outside)
    first_object: dict[int, int] = {}
    first_storage: dict[int, int] = {}
    described = []
    for k, t in enumerate(tensors):
        described.append((_tensor_metadata(t), first_object.setdefault(id(t), k), first_storage.setdefault(_storage(t), k)))
    return structure, tuple(described)


@dataclass(frozen=True)
class _Slot:
    """How to make one tensor of a rebuilt block."""

    kind: str  # "outside" (the k-th outside tensor itself), "fresh", "view" (of slot ``ref``), "outside_view" (of outside tensor ``ref``)
    ref: int
    shape: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    offset: int = 0
    dtype: torch.dtype | None = None
    device: torch.device | None = None


@dataclass(frozen=True)
class _BlockRecord:
    """The values of one block, as slots to rebuild for another block of the same kind."""

    slots: tuple[_Slot, ...]
    values: tuple  # per node: its value with tensors as ("tensor", slot index)

    @staticmethod
    def of(values: list[Any], outside: tuple) -> "_BlockRecord":
        outside_tensors: list[torch.Tensor] = []
        for v in outside:
            _tensors(v, outside_tensors)
        slot_of: dict[int, int] = {}  # id(tensor) -> slot
        slots: list[_Slot] = []
        for k, t in enumerate(outside_tensors):
            if id(t) not in slot_of:
                slot_of[id(t)] = len(slots)
                slots.append(_Slot("outside", k))
        outside_storage = {}
        for k, t in enumerate(outside_tensors):
            outside_storage.setdefault(_storage(t), k)
        owner_of: dict[int, int] = {}  # storage made in the block -> the slot that owns it
        described = []
        for value in values:
            tensors: list[torch.Tensor] = []
            shape = _tensors(value, tensors, keep=True)
            for t in tensors:
                if id(t) in slot_of:
                    continue
                size, stride, offset, dtype, device, nbytes, kind = _tensor_metadata(t)
                storage = _storage(t)
                if kind is not FakeTensor:
                    raise _NotReplayable(f"a value of type {kind.__name__}")
                if storage in outside_storage:
                    slot = _Slot("outside_view", outside_storage[storage], size, stride, offset, dtype, device)
                elif storage in owner_of:
                    if slots[owner_of[storage]].dtype != dtype:
                        raise _NotReplayable("a view with another dtype")
                    slot = _Slot("view", owner_of[storage], size, stride, offset, dtype, device)
                else:
                    if offset != 0 or nbytes != _fresh_nbytes(size, stride, dtype):
                        raise _NotReplayable("a value that does not own its storage from its start")
                    owner_of[storage] = len(slots)
                    slot = _Slot("fresh", -1, size, stride, 0, dtype, device)
                slot_of[id(t)] = len(slots)
                slots.append(slot)
            described.append(_renumber(shape, [slot_of[id(t)] for t in tensors]))
        return _BlockRecord(tuple(slots), tuple(described))

    def rebuild(self, propagator: _FakePropagator, outside: tuple) -> list[Any]:
        outside_tensors: list[torch.Tensor] = []
        for v in outside:
            _tensors(v, outside_tensors)
        made: list[torch.Tensor] = []
        metas: list[torch.Tensor | None] = []
        for slot in self.slots:
            meta = None
            if slot.kind == "outside":
                tensor = outside_tensors[slot.ref]
            elif slot.kind == "fresh":
                meta = torch.empty_strided(slot.shape, slot.stride, dtype=slot.dtype, device="meta")
                tensor = propagator.wrap(meta, slot.device)
            elif slot.kind == "view":
                meta = metas[slot.ref].as_strided(slot.shape, slot.stride, slot.offset)
                tensor = propagator.wrap(meta, slot.device)
            else:  # a view of a value from outside
                base = outside_tensors[slot.ref]
                base_meta = propagator._meta_of.get(id(base))
                if base_meta is not None:
                    meta = base_meta.as_strided(slot.shape, slot.stride, slot.offset)
                    tensor = propagator.wrap(meta, slot.device)
                else:
                    with propagator.mode:
                        tensor = base.as_strided(slot.shape, slot.stride, slot.offset)
            made.append(tensor)
            metas.append(meta)
        return [_materialise(v, made) for v in self.values]


def _fresh_nbytes(shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype) -> int:
    """The storage size a new tensor of this shape and stride gets."""
    if any(d == 0 for d in shape):
        return 0
    return (1 + sum((d - 1) * s for d, s in zip(shape, stride))) * dtype.itemsize


def _renumber(shape: Any, slots: list[int]) -> Any:
    """``shape`` (from :func:`_tensors`) with tensor indices replaced by slot indices."""
    kind, content = shape[0], shape[1]
    if kind == "tensor":
        return ("tensor", slots[content])
    if kind in ("tuple", "list"):
        return (kind, tuple(_renumber(v, slots) for v in content))
    return shape


def _materialise(shape: Any, made: list[torch.Tensor]) -> Any:
    kind, content = shape[0], shape[1]
    if kind == "tensor":
        return made[content]
    if kind == "tuple":
        return tuple(_materialise(v, made) for v in content)
    if kind == "list":
        return [_materialise(v, made) for v in content]
    if kind == "size":
        return torch.Size(content)
    return content  # a Python value, as it was


@gc_paused()
def fake_values(gm: fx.GraphModule, example_inputs: Sequence[Any], *, memoize: bool = True, reuse_from: fx.GraphModule | None = None) -> dict[fx.Node, Any]:
    """Every node's value (fake tensors, or Python values such as sizes) for these inputs.
    ``memoize``: rebuild repeated blocks from the first of their kind (module doc).
    ``reuse_from``: see :func:`propagate`."""
    mode, reused = _parameter_fakes(gm, reuse_from) if reuse_from is not None else (None, {})
    if mode is None:
        mode = FakeTensorMode(allow_non_fake_inputs=False)
    interpreter = _FakePropagator(gm, mode, memoize)
    interpreter.fake_attributes(reused)
    fake_inputs = [interpreter.fake(x) for x in example_inputs]
    with mode, torch.no_grad():
        interpreter.run(*fake_inputs)
    return interpreter.values


def propagate(gm: fx.GraphModule, example_inputs: Sequence[Any], *, memoize: bool = True, reuse_from: fx.GraphModule | None = None) -> fx.GraphModule:
    """Write ``node.meta["val"]`` (a fake tensor, or a tuple of them) on every node of ``gm``.

    ``reuse_from``: a propagated graph that reads the same parameters (a copy of ``gm``
    propagated at other input shapes, as the search's batch-1 graph is): a tensor it reads
    under the same name, whose fake there still has its shape, strides and dtype, gets that
    fake again, in that fake's mode, instead of a new one (fakes of a 96-layer GPT-3's 1,172
    parameters cost ~0.04 s). Fakes carry nothing but metadata, so the values are the same
    either way."""
    for node, value in fake_values(gm, example_inputs, memoize=memoize, reuse_from=reuse_from).items():
        node.meta["val"] = value
    return gm


def _parameter_fakes(gm: fx.GraphModule, reuse_from: fx.GraphModule) -> tuple[FakeTensorMode | None, dict[str, tuple[torch.Tensor, FakeTensor]]]:
    """(the fake mode of ``reuse_from``'s parameter fakes, get_attr target -> (the tensor
    ``gm`` reads there, its fake in ``reuse_from``)) for the targets that ``gm`` and
    ``reuse_from`` read as the same tensor object, with their fakes there still of its shape,
    strides and dtype (one mode: the first fake's)."""
    attrs = {n.target: n.meta.get("val") for n in reuse_from.graph.nodes if n.op == "get_attr"}
    read = AttributeReader(gm)
    read_there = read if reuse_from is gm else AttributeReader(reuse_from)
    mode = None
    found: dict[str, tuple[torch.Tensor, FakeTensor]] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not isinstance(fake := attrs.get(node.target), FakeTensor):
            continue
        try:
            tensor = read(node.target)  # what fx.Interpreter.get_attr reads
            same = read_there is read or read_there(node.target) is tensor
        except AttributeError:
            continue  # propagation says what is missing
        if not same or not isinstance(tensor, torch.Tensor) or fake.device != _CPU or fake.requires_grad or fake.constant is not None:
            continue
        if mode is None:
            mode = fake.fake_mode
        if fake.fake_mode is mode and fake.shape == tensor.shape and fake.stride() == tensor.stride() and fake.dtype == tensor.dtype:
            found[node.target] = (tensor, fake)
    return mode, found
