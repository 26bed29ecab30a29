"""Capture pass: an ``nn.Module`` becomes one fx graph in partc's IR.

Two frontends, tried in order:

1. ``torch.fx`` symbolic tracing with no leaf modules, so ``nn.Linear`` becomes
   ``F.linear(x, weight, bias)`` with its parameters as ``get_attr`` nodes. It is fast
   and keeps the user's functions, but fails on Python control flow that reads tensor
   values or shapes (``if x.sum() > 0``, ``if input_ids.shape[1] > n``), which is how
   HuggingFace models are written.
2. ``torch.export.export(strict=False)``, which runs the model on fake tensors with
   concrete shapes, so shape checks pass; it gives an aten-level graph. Its parameter
   placeholders are turned back into ``get_attr`` nodes with the model's own names,
   and the batch dimension is kept symbolic (``Dim.AUTO``) so that microbatches run
   through the graph. So both frontends give graphs of one form: placeholders for user inputs only,
   ``get_attr`` for every parameter, buffer and constant, call_function/call_method for
   the rest. Buffer writes (BatchNorm running statistics) are recorded, not kept as outputs.

Either way the result is a ``GraphModule`` whose attributes *are* the model's own
parameter objects (nothing is copied, so a model on the meta device stays free), with
``graph_module.meta["partc"]`` a :class:`~partc.passes.ir.GraphInfo` naming the frontend.
When neither frontend can capture the model, :class:`~partc.TraceError` names the module
and the source line that stopped it.
"""

from __future__ import annotations

import collections
import copy
import functools
import inspect
import keyword
import linecache
import operator
import sys
import traceback
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Collection, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from partc.errors import ErrorContext, TraceError
from partc.passes.ir import EXPORT_FRONTEND, FX_FRONTEND, META_KEY, GraphInfo, UncompiledGraphModule, error_context, gc_paused, is_library_file

FRONTENDS = ("auto", "fx", "export")


class _TraceThroughModules(fx.Tracer):
    """A tracer that records every module's internals (no leaf modules), and traces each
    kind of repeated block once (:class:`_RepeatedBlocks`)."""

    def __init__(self, fx_stack_traces: bool = False, reuse_blocks: bool = True):
        super().__init__()
        # fx's record_stack_traces symbolizes the whole Python stack (the source text of
        # every frame, ~60 deep inside a GPT) at every node: 40% of capturing a GPT-3.
        # partc reads only the user's frames (ir.user_source), so create_node formats those
        # alone, in the same traceback text. ``fx_stack_traces`` keeps fx's way (tests
        # compare the two).
        self.record_stack_traces = fx_stack_traces
        self._reuse_blocks = reuse_blocks and not fx_stack_traces
        self._blocks: _RepeatedBlocks | None = None
        self.formatted_frames: dict[tuple, tuple[str, bool]] = {}  # stacks -> the user's frames (_user_frames)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if not self.record_stack_traces and not node.stack_trace:
            node.stack_trace = _user_stack_trace(self.formatted_frames)
        if name is not None and self._blocks is not None:
            self._blocks.name_given[node] = name  # fx names torch functions' nodes after the function
        return node

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return False

    def trace(self, root, concrete_args=None):
        # fx finds a parameter's name by scanning named_parameters() at every access,
        # quadratic in model size (2 s of a 96-layer GPT-3's 2.4 s); look names up instead.
        # The first name wins, as in fx: a tied weight keeps the name it was first given.
        self._name_of_tensor: dict[int, str] = {}
        self._parameter_proxy_cache: dict[str, fx.Proxy] | None = None
        if isinstance(root, nn.Module):
            modules = list(root.named_modules())  # one walk: named_parameters() and named_buffers() would make two more
            kinds = ("_parameters", "_buffers") if self.proxy_buffer_attributes else ("_parameters",)
            for kind in kinds:  # as named_parameters() then named_buffers() name them
                for prefix, module in modules:
                    for attr, tensor in getattr(module, kind).items():
                        if tensor is not None:
                            self._name_of_tensor.setdefault(id(tensor), f"{prefix}.{attr}" if prefix else attr)
            if self._reuse_blocks and _RepeatedBlocks.allowed(self):
                self._blocks = _RepeatedBlocks(self, [module for _, module in modules])
        try:
            return super().trace(root, concrete_args)
        finally:
            # fx's proxies point back at the tracer, which so waits for the garbage collector;
            # what it holds is let go now (block records, formatted frames: 6,400 -> 5,500 objects
            # left for the collector after a 96-layer capture).
            self._blocks = self._parameter_proxy_cache = None
            self.formatted_frames = {}

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        self._parameter_proxy_cache = parameter_proxy_cache  # one dict for the whole trace
        proxied = isinstance(attr_val, nn.Parameter) or (self.proxy_buffer_attributes and isinstance(attr_val, torch.Tensor))
        name = self._name_of_tensor.get(id(attr_val)) if proxied else None
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if self._blocks is None or id(m) not in self._blocks.members:
            return super().call_module(m, forward, args, kwargs)
        return self._blocks.call(m, forward, args, kwargs)


# -- repeated blocks ---------------------------------------------------------------------------------
# Python values that fingerprints and records compare by value (immutable).
_PLAIN_TYPES = (int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format, type(Ellipsis))
# nn.Module attributes a fingerprint reads another way, or that tracing never runs.
_MODULE_INTERNALS = frozenset(
    (
        "_parameters",
        "_buffers",
        "_modules",
        "_non_persistent_buffers_set",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
    )
)
# Global module hooks that run around a module's call, which a copied block would skip.
# (Registration hooks run only when a module, parameter or buffer is registered: a block
# whose trace registers one changes its fingerprint and is traced at every call. torch 2.11's
# export leaves a buffer registration hook behind, which must not turn reuse off for good.)
_GLOBAL_MODULE_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called",
)


class _NotReusable(Exception):
    """A block call (or a recorded block) that must be traced as usual."""


def _plain_key(value: Any) -> Any:
    """A hashable key equal for equal plain values (type included: 1, 1.0 and True differ)."""
    if isinstance(value, _PLAIN_TYPES):
        return (type(value), repr(value))  # repr: nan equals nan, -0.0 differs from 0.0
    if isinstance(value, (tuple, list, frozenset)):
        return (type(value), tuple(_plain_key(v) for v in value))
    if isinstance(value, slice):
        return (slice, _plain_key(value.start), _plain_key(value.stop), _plain_key(value.step))
    raise _NotReusable(f"{type(value).__name__} is not a plain value")


def _class_state(cls: type) -> tuple:
    """The plain values a module's own classes hold (a class-level flag or counter its
    forward may read), so that changing one changes the fingerprint. torch's classes
    (nn.Module, nn.Linear) hold constants only and are left out (they are most of the cost)."""
    state = []
    for klass in cls.__mro__:
        if klass.__module__ == "builtins" or klass.__module__.startswith("torch."):
            continue
        for attr, value in vars(klass).items():
            if isinstance(value, _PLAIN_TYPES) and not attr.startswith("__"):
                state.append((klass.__qualname__, attr, type(value), repr(value)))
    return tuple(state)


def _check_node_arguments(value: Any) -> None:
    """Node arguments a copy may reuse as they are: nodes and plain values, nested."""
    if isinstance(value, fx.Node):
        return
    if isinstance(value, (tuple, list)):
        for v in value:
            _check_node_arguments(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            _plain_key(k)
            _check_node_arguments(v)
    elif isinstance(value, slice):
        for v in (value.start, value.stop, value.step):
            _check_node_arguments(v)
    else:
        _plain_key(value)


def _under(name: str, prefix: str) -> bool:
    """``name`` is ``prefix`` or inside it (``blocks.1``, ``blocks.1.attn``, ``blocks.1@2``), not ``blocks.10``."""
    return name == prefix or (name.startswith(prefix) and name[len(prefix)] in ".@")


@dataclass(frozen=True)
class _BlockCall:
    """One call of a repeated block, described as far as tracing it can depend on."""

    module: nn.Module
    prefix: str  # its qualified name
    key: tuple  # fingerprint, argument structure, grad and autocast modes: equal keys trace to equal nodes
    leaves: tuple  # the flattened (args, kwargs)
    tensor_names: tuple[str, ...]  # its parameters' and buffers' qualified names
    module_paths: tuple[str, ...]  # its modules' qualified names


@dataclass(frozen=True)
class _BlockRecord:
    """The nodes one traced call of a block made, relative to the block's name."""

    prefix: str
    nodes: tuple[fx.Node, ...]
    names: tuple[str | None, ...]  # per node: the name the tracer asked for (derived from the target)
    inputs: dict  # node of an argument -> index of the first leaf holding it
    output_spec: Any
    outputs: tuple  # per output leaf: ("node", i), ("input", leaf index) or ("value", value)
    stack_suffixes: tuple[str | None, ...]  # per node: its frames inside the block (None: no stack_trace)
    inner_stacks: tuple[tuple[tuple[str, str, Any], ...], ...]  # per node: (key, path, type) entries inside the block, relative
    scopes: tuple[tuple[str, Any], ...]  # per node: node_name_to_scope entry, path relative
    cached: tuple[int, ...]  # get_attr nodes the tracer's parameter cache holds
    calls: tuple[tuple[str, int], ...]  # (relative module path, calls made)


class _RepeatedBlocks:
    """Each kind of repeated block traced once; every later call is a copy of its nodes.

    A transformer is a ModuleList of blocks that trace to the same nodes up to names, and
    fx tracing costs ~0.1 ms per node (proxies, argument wrapping, stack traces). The first
    call of each kind (an element of a ``ModuleList``/``Sequential`` with a given
    fingerprint, called with a given argument structure) is traced as usual and recorded;
    a later call of the same kind gets the recorded nodes again, through ``Graph.create_node``
    in the same order with the same targets (``get_attr`` targets renamed ``blocks.0.x`` ->
    ``blocks.k.x``), so fx's namespace gives them the names tracing gives, and with the
    metadata tracing writes: ``nn_module_stack`` (the entries outside the block as they are
    at this call, the block's own renamed), ``stack_trace`` (the frames outside the block as
    they are at this call, then the recorded frames inside it), the tracer's
    ``node_name_to_scope``, call counts and parameter cache.

    What tracing a block can depend on, and what a call's key holds:

    - the fingerprint (:meth:`fingerprint`): every module's class, name and non-tensor
      attributes (plain values by value, anything else by identity, so a different flag or a
      bound method differs), its classes' plain class attributes, its parameters' and buffers' names, shapes, strides, dtypes,
      devices and ``requires_grad``, that no forward or backward hook is registered, and that
      every module and tensor in it has the block's own name (nothing shared with the rest of
      the model);
    - the arguments: their pytree structure, which leaves are the same proxy, and the value
      of every leaf that is no proxy (plain values only; anything else is traced);
    - the grad and autocast modes.

    A record is kept only when the traced call was self-contained: its nodes read only each
    other and the call's proxies, every argument of every node is a node or a plain value,
    every ``get_attr`` is one of the block's own tensors (named by fx from its target), every
    node's metadata is the two keys above with the outside part equal to the call's, and
    tracing it changed no attribute of the block (its fingerprint after equals before).
    Other nodes keep the name fx asked for (it names a torch function's node after the
    function), so a copy asks for the same.
    Otherwise that kind is traced at every call. Nothing is reused with fx's full stack
    traces, with fx's preserved node metadata, or with global module hooks registered.
    What tracing cannot see cannot be checked: a block whose Python code reads mutable
    global state that changes between its calls would be copied from its first call.
    """

    def __init__(self, tracer: _TraceThroughModules, modules: list[nn.Module]):
        """``modules``: the root's, as ``root.modules()`` lists them."""
        self.tracer = tracer
        self.members: set[int] = set()  # id() of every element of a ModuleList / Sequential
        for container in modules:
            if isinstance(container, (nn.ModuleList, nn.Sequential)):
                self.members.update(id(child) for name, child in container.named_children() if name.isdigit())
        self.records: dict[tuple, _BlockRecord | None] = {}  # call key -> record (None: trace every call)
        self.name_given: dict[fx.Node, str] = {}  # node -> the name the tracer asked for
        self.reused = 0  # calls copied from a record (for tests and benchmarks)

    @staticmethod
    def allowed(tracer: fx.Tracer) -> bool:
        """Whether anything outside the blocks could make two identical blocks trace differently."""
        import torch.fx.traceback as fx_traceback
        from torch.nn.modules import module as module_globals

        if tracer.record_stack_traces or tracer.check_mutable_operations or fx_traceback.has_preserved_node_meta():
            return False
        return not any(getattr(module_globals, hooks, None) for hooks in _GLOBAL_MODULE_HOOKS)

    # -- calls -----------------------------------------------------------------------------------
    def call(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        tracer = self.tracer
        outer_frames, found_forward = _user_frames(sys._getframe(1), tracer.formatted_frames)  # the frames outside the block
        try:
            if not found_forward:
                raise _NotReusable("no forward() frame outside the block")
            call = self.describe(m, args, kwargs)
        except _NotReusable:
            return fx.Tracer.call_module(tracer, m, forward, args, kwargs)
        if call.key in self.records:
            record = self.records[call.key]
            if record is not None and self.fresh(call):
                self.reused += 1
                return self.replay(record, call, outer_frames)
            return fx.Tracer.call_module(tracer, m, forward, args, kwargs)
        if not self.fresh(call):
            return fx.Tracer.call_module(tracer, m, forward, args, kwargs)
        last = next(iter(reversed(tracer.graph.nodes)), None)
        outer_stack = list(tracer.module_stack.items())
        output = fx.Tracer.call_module(tracer, m, forward, args, kwargs)
        try:
            nodes = self._nodes_after(last)
            self.records[call.key] = self.record(call, nodes, output, outer_stack, outer_frames)
        except _NotReusable:
            self.records[call.key] = None
        return output

    def describe(self, m: nn.Module, args: tuple, kwargs: dict) -> _BlockCall:
        tracer = self.tracer
        prefix = tracer.path_of_module(m)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        first_leaf: dict[int, int] = {}
        leaf_keys = []
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, fx.Proxy):
                if type(leaf) is not fx.Proxy or leaf.tracer is not tracer:
                    raise _NotReusable("an argument is a lazy attribute proxy or another tracer's")
                leaf_keys.append(("proxy", first_leaf.setdefault(id(leaf.node), i)))
            else:
                leaf_keys.append(("value", _plain_key(leaf)))
        try:
            hash(spec)
        except TypeError as e:
            raise _NotReusable("unhashable argument structure") from e
        fingerprint, tensor_names, module_paths = self.fingerprint(m, prefix)
        modes = (torch.is_grad_enabled(), torch.is_autocast_enabled())
        return _BlockCall(m, prefix, (fingerprint, spec, tuple(leaf_keys), modes), tuple(leaves), tensor_names, module_paths)

    def fingerprint(self, block: nn.Module, prefix: str) -> tuple[tuple, tuple[str, ...], tuple[str, ...]]:
        """(what tracing ``block`` can read from it, its tensors' names, its modules' names)."""
        tracer = self.tracer
        parts = []
        tensor_names = []
        module_paths = []
        for name, module in block.named_modules(remove_duplicate=False):
            path = f"{prefix}.{name}" if name else prefix
            if tracer.path_of_module(module) != path:
                raise _NotReusable(f"module {path} is shared")
            module_paths.append(path)
            attributes = []
            for attr, value in vars(module).items():
                if attr in _MODULE_INTERNALS:
                    continue
                if "hook" in attr and isinstance(value, dict):
                    if value:
                        raise _NotReusable(f"{path} has hooks")
                    continue
                try:
                    attributes.append((attr, _plain_key(value)))
                except _NotReusable:
                    attributes.append((attr, ("object", id(value))))
            tensors = []
            for kind in ("_parameters", "_buffers"):
                for attr, tensor in getattr(module, kind).items():
                    if tensor is None:
                        tensors.append((kind, attr, None))
                        continue
                    tensor_name = f"{path}.{attr}"
                    if tracer._name_of_tensor.get(id(tensor)) != tensor_name:
                        raise _NotReusable(f"{tensor_name} is shared or not proxied")
                    tensor_names.append(tensor_name)
                    facts = (type(tensor), tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device, tensor.requires_grad)
                    tensors.append((kind, attr, facts))
            persistent = tuple(sorted(module._non_persistent_buffers_set))
            parts.append((name, type(module), tuple(attributes), tuple(tensors), persistent, _class_state(type(module))))
        return tuple(parts), tuple(tensor_names), tuple(module_paths)

    def fresh(self, call: _BlockCall) -> bool:
        """Whether tracing ``call`` now would start from nothing of the block's: no module of
        it called before and none of its tensors read before (fx would reuse those nodes)."""
        cache = self.tracer._parameter_proxy_cache
        if cache is None:
            return False  # the cache is not known yet: read once a module attribute is
        return not any(path in self.tracer.num_calls for path in call.module_paths) and not any(name in cache for name in call.tensor_names)

    def _nodes_after(self, last: fx.Node | None) -> list[fx.Node]:
        nodes = []
        for node in reversed(self.tracer.graph.nodes):
            if node is last:
                break
            nodes.append(node)
        else:
            if last is not None:
                raise _NotReusable("a node before the block was erased")
        nodes.reverse()
        return nodes

    # -- records ---------------------------------------------------------------------------------
    def record(self, call: _BlockCall, nodes: list[fx.Node], output: Any, outer_stack: list, outer_frames: str) -> _BlockRecord:
        """The record of a traced ``call`` that made ``nodes`` and returned ``output``; raises
        _NotReusable when a copy could not reproduce them (see the class doc)."""
        tracer = self.tracer
        prefix = call.prefix
        if self.fingerprint(call.module, prefix)[0] != call.key[0]:
            raise _NotReusable("tracing the block changed its attributes")
        inputs: dict[fx.Node, int] = {}
        for i, leaf in enumerate(call.leaves):
            if isinstance(leaf, fx.Proxy):
                inputs.setdefault(leaf.node, i)
        position = {node: i for i, node in enumerate(nodes)}
        cache = tracer._parameter_proxy_cache or {}
        names, stack_suffixes, inner_stacks, scopes, cached = [], [], [], [], []
        for i, node in enumerate(nodes):
            if node.op not in ("call_function", "call_method", "get_attr") or (node.op == "get_attr" and node in self.name_given):
                raise _NotReusable(f"{node.name} cannot be copied")
            names.append(self.name_given.get(node))
            _check_node_arguments((node.args, node.kwargs))
            for used in node.all_input_nodes:
                if used not in position and used not in inputs:
                    raise _NotReusable(f"{node.name} reads {used.name}, made outside the block")
            if node.op == "call_function" and isinstance(getattr(node.target, "__self__", None), nn.Module):
                raise _NotReusable(f"{node.name} calls a method of a module")
            if node.op == "get_attr":
                if not node.target.startswith(prefix + "."):
                    raise _NotReusable(f"{node.name} reads {node.target}, outside the block")
                proxy = cache.get(node.target)
                if proxy is not None and proxy.node is node:
                    cached.append(i)
            if not set(node.meta) <= {"nn_module_stack", "stack_trace"} or "nn_module_stack" not in node.meta:
                raise _NotReusable(f"{node.name} has metadata a copy would not write")
            entries = list(node.meta["nn_module_stack"].items())
            if entries[: len(outer_stack)] != outer_stack:
                raise _NotReusable(f"{node.name}'s module stack does not start with the call's")
            inner = []
            for key, (path, module_type) in entries[len(outer_stack) :]:
                if not (_under(key, prefix) and _under(path, prefix)):
                    raise _NotReusable(f"{node.name} is in module {path}, outside the block")
                inner.append((key[len(prefix) :], path[len(prefix) :], module_type))
            inner_stacks.append(tuple(inner))
            stack_suffixes.append(self._stack_suffix(node, outer_frames))
            scope_path, scope_type = tracer.node_name_to_scope[node.name]
            if not _under(scope_path, prefix):
                raise _NotReusable(f"{node.name} is scoped outside the block")
            scopes.append((scope_path[len(prefix) :], scope_type))
        leaves, output_spec = pytree.tree_flatten(output)
        outputs = []
        for leaf in leaves:
            if isinstance(leaf, fx.Proxy):
                if type(leaf) is not fx.Proxy or leaf.tracer is not tracer:
                    raise _NotReusable("the block returns a lazy attribute proxy")
                same_leaf = next((i for i, arg in enumerate(call.leaves) if arg is leaf), None)
                if same_leaf is not None:
                    outputs.append(("input", same_leaf))
                elif leaf.node in position:
                    outputs.append(("node", position[leaf.node]))
                else:
                    raise _NotReusable("the block returns a proxy it did not make")
            else:
                _plain_key(leaf)
                outputs.append(("value", leaf))
        calls = tuple((path[len(prefix) :], tracer.num_calls[path]) for path in call.module_paths if path in tracer.num_calls)
        return _BlockRecord(prefix, tuple(nodes), tuple(names), inputs, output_spec, tuple(outputs), tuple(stack_suffixes), tuple(inner_stacks), tuple(scopes), tuple(cached), calls)

    @staticmethod
    def _stack_suffix(node: fx.Node, outer_frames: str) -> str | None:
        """``node``'s frames inside the block: its stack trace less the call's frames."""
        if "stack_trace" not in node.meta:
            return None
        trace = node.meta["stack_trace"]
        if not isinstance(trace, str):
            raise _NotReusable(f"{node.name} has no text stack trace")
        if not outer_frames:
            return trace
        if trace == outer_frames:
            return ""
        if not trace.startswith(outer_frames + "\n"):
            raise _NotReusable(f"{node.name}'s stack trace does not start with the call's")
        return trace[len(outer_frames) + 1 :]

    def replay(self, record: _BlockRecord, call: _BlockCall, outer_frames: str) -> Any:
        """The nodes tracing ``call`` would make, copied from ``record``; returns what the call
        would. ``outer_frames``: the user's frames at the call, outside the block."""
        tracer = self.tracer
        graph = tracer.graph
        prefix = call.prefix
        outer_stack = list(tracer.module_stack.items())
        env: dict[fx.Node, fx.Node] = {node: call.leaves[i].node for node, i in record.inputs.items()}
        copies = []
        cache = tracer._parameter_proxy_cache
        # A block's nodes share a few module stacks, scopes and stack traces: rename each once.
        stacks: dict[tuple, list] = {}
        scopes: dict[tuple, tuple[str, Any]] = {}
        traces: dict[str, str] = {}
        for node, name, suffix, inner, scope in zip(record.nodes, record.names, record.stack_suffixes, record.inner_stacks, record.scopes):
            target = prefix + node.target[len(record.prefix) :] if node.op == "get_attr" else node.target
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            # Made without arguments, then given them: create_node walks the arguments with
            # pytree looking for SymInts (torch 2.13), and a record's are nodes and plain values.
            copy = graph.create_node(node.op, target, (), {}, name, node.type)
            copy.args = args
            if kwargs:
                copy.kwargs = kwargs
            if name is not None:
                self.name_given[copy] = name  # a record of an enclosing block copies it with this name
            if scope not in scopes:
                scopes[scope] = (prefix + scope[0], scope[1])
            tracer.node_name_to_scope[copy.name] = scopes[scope]
            if inner not in stacks:
                stacks[inner] = outer_stack + [(prefix + key, (prefix + path, module_type)) for key, path, module_type in inner]
            copy.meta["nn_module_stack"] = collections.OrderedDict(stacks[inner])
            if suffix is not None:
                if suffix not in traces:
                    traces[suffix] = "\n".join(part for part in (outer_frames, suffix) if part)
                copy.meta["stack_trace"] = traces[suffix]  # what Node.stack_trace's setter writes
            env[node] = copy
            copies.append(copy)
        for i in record.cached:
            cache[copies[i].target] = tracer.proxy(copies[i])
        for path, count in record.calls:
            tracer.num_calls[prefix + path] = count
        leaves = []
        for kind, value in record.outputs:
            if kind == "input":
                leaves.append(call.leaves[value])
            elif kind == "node":
                leaves.append(tracer.proxy(copies[value]))
            else:
                leaves.append(value)
        return pytree.tree_unflatten(leaves, record.output_spec)


@functools.lru_cache(maxsize=None)
def _is_library_file(path: str) -> bool:
    return is_library_file(path)


def _user_stack_trace(formatted: dict[tuple, tuple[str, bool]]) -> str:
    """The user's frames of the current stack from the outermost ``forward`` in, as
    ``traceback`` formats them (``File "f.py", line 3, in forward`` and the code line):
    what fx's filtered stack traces hold (nothing outside a forward, so placeholders get
    none), without symbolizing the frames it drops."""
    return _user_frames(sys._getframe(1), formatted)[0]


def _user_frames(frame, formatted: dict[tuple, tuple[str, bool]]) -> tuple[str, bool]:
    """(the user's frames from the outermost ``forward`` to ``frame``, formatted, whether the
    stack holds a ``forward`` at all). ``formatted``: stacks -> their result, kept by the
    caller (every block of a model is called from the same lines)."""
    stack = []
    while frame is not None:
        stack.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    key = tuple(stack)
    found = formatted.get(key)
    if found is None:
        found = formatted[key] = _format_user_frames(stack)
    return found


def _format_user_frames(stack: list[tuple[str, int, str]]) -> tuple[str, bool]:
    """:func:`_user_frames` of ``stack``: (file, line, function) from the innermost frame out."""
    stack = stack[::-1]
    first_forward = next((i for i, (_, _, name) in enumerate(stack) if name == "forward"), None)
    if first_forward is None:
        return "", False
    text = "\n".join(
        f'  File "{file}", line {line}, in {name}\n    {linecache.getline(file, line).strip()}'
        for file, line, name in stack[first_forward:]
        if not _is_library_file(file)
    )
    return text, True


@gc_paused()
def capture(model: nn.Module, example_inputs: Sequence[Any], *, frontend: str = "auto", reuse_blocks: bool = True) -> fx.GraphModule:
    """Capture ``model`` called on ``example_inputs`` into an fx GraphModule.

    ``frontend``: "auto" (symbolic tracing, then torch.export), "fx" or "export".
    ``reuse_blocks=False`` traces every repeated block instead of copying the first one's
    nodes (:class:`_RepeatedBlocks`; the graph is the same either way).
    """
    if frontend not in FRONTENDS:
        raise TraceError(f"unknown frontend {frontend!r}; choose one of {', '.join(FRONTENDS)}")
    if not isinstance(model, nn.Module):
        raise TraceError(f"partc captures torch.nn.Module objects, got {type(model).__name__}")
    args = tuple(example_inputs)
    _check_arity(model, len(args))
    _check_input_kinds(model, args)
    _check_names(model)
    fx_error: BaseException | None = None
    if frontend in ("auto", "fx"):
        try:
            return _symbolic_trace(model, len(args), reuse_blocks)
        except Exception as e:  # noqa: BLE001 - any failure here means "try torch.export"
            if frontend == "fx":
                raise _trace_error(model, e, "torch.fx symbolic tracing") from e
            fx_error = e
    try:
        reason = None if fx_error is None else f"{type(fx_error).__name__}: {_first_line(fx_error)}"
        return _export(model, args, reason)
    except TraceError:
        raise  # already names what stopped the capture, and the fix
    except Exception as e:  # noqa: BLE001
        raise _trace_error(model, e, "torch.fx symbolic tracing and torch.export" if fx_error else "torch.export") from e


def _check_names(model: nn.Module) -> None:
    """fx writes ``self.<name>`` for every attribute it reads, so a submodule or tensor named
    with a Python keyword (``add_module("class", ...)``) would make invalid code."""
    parts: set[str] = set()  # every part of every name (and of tied tensors' second names), from one walk
    for name, module in model.named_modules():
        parts.update(name.split("."), module._parameters, module._buffers)
    if parts.isdisjoint(keyword.kwlist):
        return
    # the loop below finds the first bad name
    names = [name for name, _ in model.named_modules()] + [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
    for name in names:
        bad = [part for part in name.split(".") if keyword.iskeyword(part)]
        if bad:
            raise TraceError(
                f"{type(model).__name__} has a submodule or tensor named {name!r}: {bad[0]!r} is a Python keyword, "
                "and torch.fx generates attribute access from these names",
                ErrorContext(pass_name="capture", module=name.rpartition(".")[0] if name.rpartition(".")[0] else name, fix=f"rename {bad[0]!r} (e.g. {bad[0] + '_'!r}); state-dict keys follow the new name"),
            )


def _positional_parameters(model: nn.Module) -> list[inspect.Parameter]:
    parameters = inspect.signature(model.forward).parameters.values()
    return [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _check_arity(model: nn.Module, num_args: int) -> None:
    """Refuse example_inputs that cannot be forward()'s arguments, before any tracing."""
    parameters = inspect.signature(model.forward).parameters.values()
    keyword_only = [p.name for p in parameters if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    if keyword_only:
        raise TraceError(
            f"{type(model).__name__}.forward() needs the keyword-only argument(s) {', '.join(keyword_only)}, which example_inputs cannot give",
            ErrorContext(pass_name="capture", module="", fix="give them defaults (traced at the default), or make them positional and pass them in example_inputs"),
        )
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return
    positional = _positional_parameters(model)
    missing = [p.name for p in positional[num_args:] if p.default is p.empty]
    if num_args > len(positional) or missing:
        names = ", ".join(p.name for p in positional)
        raise TraceError(
            f"{type(model).__name__}.forward({names}) cannot take the {num_args} example input(s) given",
            ErrorContext(pass_name="capture", module="", fix=f"pass one tensor per forward() argument{' (missing: ' + ', '.join(missing) + ')' if missing else ''}"),
        )


def _check_input_kinds(model: nn.Module, args: tuple) -> None:
    """Tensors and Python constants (flags, numbers, None: traced as constants) can be
    inputs; a container of tensors cannot be split into microbatches or sent between
    pipeline stages, so it is refused here rather than deep inside a later pass."""
    names = [p.name for p in _positional_parameters(model)]
    for i, value in enumerate(args):
        if isinstance(value, (dict, list, tuple)):
            name = names[i] if i < len(names) else f"#{i}"
            raise TraceError(
                f"example input {name!r} of {type(model).__name__}.forward() is a {type(value).__name__}; "
                "partc takes tensors and Python constants (flags, numbers, None) as inputs",
                ErrorContext(pass_name="capture", module="", fix=f"pass each tensor in {name!r} as its own forward() argument (a wrapper module whose forward takes them and rebuilds the {type(value).__name__})"),
            )


def _symbolic_trace(model: nn.Module, num_args: int, reuse_blocks: bool = True) -> fx.GraphModule:
    positional = _positional_parameters(model)
    # Arguments the caller leaves at their defaults (attention_mask=None) are traced as
    # those constants, so `if attention_mask is not None` takes the branch the user's call takes.
    defaults = {p.name: p.default for p in positional[num_args:]}
    tracer = _TraceThroughModules() if reuse_blocks else _TraceThroughModules(reuse_blocks=False)
    graph = tracer.trace(model, concrete_args=defaults or None)
    for node in [n for n in graph.nodes if n.op == "placeholder"][num_args:]:
        for check in [u for u in node.users if u.target is fx._symbolic_trace._assert_is_none]:
            graph.erase_node(check)  # the constant is the user's own default
        if node.users:
            raise TypeError(f"forward() argument {node.target!r} is used although it was left at its default")
        graph.erase_node(node)
    # Its code is generated when it first runs: partc.plan adds the loss (attach_loss) and
    # then only reads the nodes. fx generates code for any graph tracing makes (every
    # argument is one Tracer.create_arg accepts), so nothing that fails here is deferred.
    gm = UncompiledGraphModule(model, graph, class_name=type(model).__name__)
    gm.meta[META_KEY] = GraphInfo(frontend=FX_FRONTEND)
    return gm


def _export(model: nn.Module, args: tuple, fallback_reason: str | None) -> fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export's own notices are not the user's concern
        exported = torch.export.export(model, args, strict=False, dynamic_shapes=_batch_dynamic(args))
    signature = exported.graph_signature
    names_of = {
        **signature.inputs_to_parameters,
        **signature.inputs_to_buffers,
        **getattr(signature, "inputs_to_lifted_tensor_constants", {}),
    }
    state = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
    state.update({name: value for name, value in exported.constants.items() if name not in state})
    # A tied tensor (lm_head.weight is wte.weight) gets one placeholder per name, and export
    # may route every use through one of them; read it through one get_attr under its
    # first name, as symbolic tracing does.
    first_name: dict[int, str] = {}
    for name, value in [*model.named_parameters(), *model.named_buffers()]:
        first_name.setdefault(id(value), name)

    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    attr_nodes: dict[str, fx.Node] = {}
    for node in exported.graph_module.graph.nodes:
        if node.op == "placeholder" and node.name in names_of:
            name = names_of[node.name]
            name = first_name.get(id(state[name]), name)
            if name not in attr_nodes:
                attr_nodes[name] = graph.get_attr(name)
                attr_nodes[name].meta = dict(node.meta)
            env[node] = attr_nodes[name]
        elif node.op == "output":
            graph.output(fx.node.map_arg(_user_outputs(node, signature, exported.call_spec.out_spec), lambda n: env[n]))
            if _plain_outputs(exported.call_spec.out_spec) and not _plain_containers(exported.call_spec.out_spec):
                graph.set_codegen(RestoreOutputType(exported.call_spec.out_spec))
        else:
            _copy_node(exported.graph_module, node, graph, env)
    for node in attr_nodes.values():
        if not node.users:  # a name export lifted but forward never read
            graph.erase_node(node)

    root = {node.target: state[node.target] for node in graph.nodes if node.op == "get_attr"}
    gm = fx.GraphModule(root, graph, class_name=type(model).__name__)
    mutated = tuple(sorted(getattr(signature, "buffers_to_mutate", {}).values()))
    gm.meta[META_KEY] = GraphInfo(frontend=EXPORT_FRONTEND, fallback_reason=fallback_reason, mutated_buffers=mutated)
    return gm


def _copy_node(owner: fx.GraphModule, node: fx.Node, graph: fx.Graph, env: dict[fx.Node, Any]) -> None:
    """Copy one node of an exported graph into ``graph``, inlining the regions export wraps
    in higher-order ops, so that the IR is one flat graph of operators.

    ``torch.no_grad()`` inside forward (HF's rotary embeddings decorate their forward with
    it) becomes ``wrap_with_set_grad_enabled(False, submodule, *args)``, and
    ``torch.autocast(enabled=False)`` becomes ``wrap_with_autocast(...)``. The region's
    operators are inlined; a region run without gradients gets its outputs detached, so no
    gradient flows through it, as in the model."""
    region = _wrapped_region(owner, node)
    if region is None:
        if node.op == "get_attr" and isinstance(getattr(owner, node.target, None), fx.GraphModule):
            return  # a wrapped region's code, inlined where it is called
        if node.op == "call_function" and node.target is operator.getitem and isinstance(env.get(node.args[0]), tuple):
            env[node] = env[node.args[0]][node.args[1]]  # one output of an inlined region
            return
        env[node] = graph.node_copy(node, lambda n: env[n])
        return
    submodule, args, grad_enabled = region
    inner: dict[fx.Node, Any] = {}
    placeholders = [n for n in submodule.graph.nodes if n.op == "placeholder"]
    for placeholder, arg in zip(placeholders, args):
        inner[placeholder] = fx.node.map_arg(arg, lambda n: env[n])
    outputs: tuple = ()
    for sub in submodule.graph.nodes:
        if sub.op == "output":
            outputs = tuple(fx.node.map_arg(sub.args[0], lambda n: inner[n]))
        elif sub.op != "placeholder":
            _copy_node(submodule, sub, graph, inner)
    if not grad_enabled:
        outputs = tuple(_detached(graph, out) for out in outputs)
    env[node] = outputs


def _wrapped_region(owner: fx.GraphModule, node: fx.Node) -> tuple[fx.GraphModule, tuple, bool] | None:
    """(region code, its arguments, whether it computes gradients) when ``node`` is a
    higher-order op that only wraps a region in a grad mode (or in autocast switched off);
    None when it is no higher-order op. Any other higher-order op (an autocast region,
    ``torch.cond``) changes what the region computes: TraceError."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
        return None
    name = node.target.name()
    if name == "wrap_with_set_grad_enabled":
        enabled, body, *args = node.args
        return getattr(owner, body.target), tuple(args), bool(enabled)
    if name == "wrap_with_autocast":
        _device_type, _dtype, enabled, _cache, body, *args = node.args
        if not enabled:  # autocast switched off: the region runs in the dtypes it names
            return getattr(owner, body.target), tuple(args), True
    # The wrapper node has no source of its own: blame the region's first operator.
    bodies = [getattr(owner, a.target) for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
    inside = [n for body in bodies if isinstance(body, fx.GraphModule) for n in body.graph.nodes if n.op == "call_function"]
    context = error_context(inside[0] if inside else node, "capture", fix="remove torch.autocast, torch.cond and other region wrappers from forward()")
    raise TraceError(f"torch.export wrapped part of forward in {name!r}, which partc cannot run as plain operators", replace(context, node=node.format_node()))


def _detached(graph: fx.Graph, value: Any) -> Any:
    if not isinstance(value, fx.Node):
        return value
    detached = graph.call_function(torch.ops.aten.detach.default, (value,))
    detached.meta = dict(value.meta)
    return detached


def _batch_dynamic(args: tuple) -> tuple | None:
    """Mark dim 0 of every tensor input as dynamic, so that the graph computes batch sizes
    instead of baking them in as constants (a pipeline runs it on microbatches)."""
    auto = getattr(torch.export.Dim, "AUTO", None)
    if auto is None:  # torch < 2.6: the graph keeps the example's batch size
        return None
    return tuple({0: auto} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)


def _user_outputs(output_node: fx.Node, signature, out_spec) -> Any:
    """The user's outputs (export puts buffer updates first), in the structure forward
    returned when that is made of dicts, lists and tuples (``{"logits": ...}``), so that the
    user's loss_fn gets what it gets from the model. A dict subclass (HF's ``ModelOutput``)
    is kept as a plain dict of its fields; :class:`RestoreOutputType` gives the generated
    code its type back."""
    flat = list(output_node.args[0])
    kinds = [spec.kind.name for spec in signature.output_specs]
    user = [value for value, kind in zip(flat, kinds) if kind == "USER_OUTPUT"]
    if out_spec is not None and _plain_outputs(out_spec):
        return _as_plain(out_spec, iter(user))
    return user[0] if len(user) == 1 else tuple(user)


def _children(spec) -> list:
    return list(spec.children() if hasattr(spec, "children") else spec.children_specs)


def _plain_containers(spec) -> bool:
    return spec.is_leaf() or (spec.type in (dict, list, tuple) and all(_plain_containers(child) for child in _children(spec)))


def _plain_outputs(spec) -> bool:
    """Whether ``spec`` is made of leaves, lists, tuples and dicts, dict subclasses whose
    pytree context is their keys (``OrderedDict``, HF's ``ModelOutput``) included."""
    if spec.is_leaf():
        return True
    keyed = isinstance(spec.type, type) and issubclass(spec.type, dict) and isinstance(spec.context, list)
    return (spec.type in (list, tuple) or keyed) and all(_plain_outputs(child) for child in _children(spec))


def _as_plain(spec, leaves) -> Any:
    """``leaves`` (an iterator, in pytree order) in ``spec``'s structure, with every dict
    subclass made a plain dict of the same keys in the same order."""
    if spec.is_leaf():
        return next(leaves)
    children = [_as_plain(child, leaves) for child in _children(spec)]
    return dict(zip(spec.context, children)) if issubclass(spec.type, dict) else spec.type(children)


class RestoreOutputType(fx.graph.CodeGen):
    """Code generation that returns forward()'s own output type.

    HuggingFace models return ``ModelOutput`` objects (``out.logits``, ``out["logits"]``,
    ``out[0]``). The IR keeps their fields as a plain dict, which every pass reads; the
    generated ``forward`` (of the captured graph, of the last pipeline stage, of a
    tensor-parallel rank) rebuilds the object from it, so the user's loss_fn gets what
    the model gives it::

        return restore_output_type({'logits': linear_12})
    """

    def __init__(self, out_spec):
        super().__init__()
        self.out_spec = out_spec

    def restore(self, plain: Any) -> Any:
        return pytree.tree_unflatten(pytree.tree_leaves(plain), self.out_spec)

    def process_outputs(self, outputs: Any) -> Any:
        return self.restore(outputs)

    def additional_globals(self) -> list[tuple[str, Any]]:
        return [*super().additional_globals(), ("restore_output_type", self.restore)]

    def generate_output(self, output_args: Any, *args: Any, **kwargs: Any) -> str:
        plain = super().generate_output(output_args, *args, **kwargs).removeprefix("return ")
        return f"return restore_output_type({plain})"


def copy_output_type(source: fx.Graph, target: fx.Graph) -> None:
    """Make ``target`` (a graph built from ``source`` that returns the same output: the last
    pipeline stage, a tensor-parallel rank) return the output type ``source`` returns."""
    codegen = getattr(source, "_codegen", None)
    if isinstance(codegen, RestoreOutputType):
        target.set_codegen(RestoreOutputType(codegen.out_spec))


def _trace_error(model: nn.Module, error: BaseException, frontends: str) -> TraceError:
    module, source = _blame(model, error)
    return TraceError(
        f"{frontends} could not capture {type(model).__name__}: {type(error).__name__}: {_first_line(error)}",
        ErrorContext(
            pass_name="capture",
            module=module,
            source=source,
            fix=(
                "replace Python control flow on tensor values with torch.where / torch.cond, "
                "move data-dependent checks out of forward(), or pass every forward() argument "
                "as a tensor in example_inputs"
            ),
        ),
    )


def _blame(model: nn.Module, error: BaseException) -> tuple[str | None, str | None]:
    """The module and the user's source line where ``error`` was raised (innermost wins)."""
    names = {id(m): name for name, m in model.named_modules()}
    module = source = None
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for exc in chain:
        tb = exc.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if not is_library_file(frame.f_code.co_filename):
                owner = frame.f_locals.get("self")
                if id(owner) in names:
                    module = names[id(owner)]
                summary = traceback.extract_tb(tb, limit=1)[0]
                source = f"{summary.filename.rsplit('/', 1)[-1]}:{summary.lineno}  {(summary.line or '').strip()}"
            tb = tb.tb_next
        if source is not None:
            break
    return module, source


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


LOSS_FN_KEY = "partc_loss_fn"  # node.meta: copied from loss_fn (attach_loss); GraphModule.meta: loss_fn's own graph module


class _LossTracer(fx.Tracer):
    """Traces ``loss_fn`` through every module it calls, also one that is not a submodule of
    the trace's root (``loss_fn=nn.CrossEntropyLoss(weight=w)``, or a closure calling one):
    fx would otherwise stop at it ("module is not installed as a submodule"). Such a
    module's tensors (class weights) become constants of the graph."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return False

    def path_of_module(self, mod: nn.Module) -> str:
        try:
            return super().path_of_module(mod)
        except NameError:  # called by loss_fn, not held by the root: traced through all the same
            return f"loss_fn.{type(mod).__name__}"


def trace_loss_fn(
    loss_fn: Callable[[Any, Any], Any], model_output: Any, restore: Callable[[Any], Any] = lambda plain: plain, taken: Callable[[str], bool] = lambda name: False
) -> fx.GraphModule:
    """``loss_fn`` traced on its own with ``torch.fx``: a flat graph taking one placeholder
    per leaf of ``model_output`` (the model graph's output value: a node, or a structure of
    them), then ``targets``, and returning the loss.

    A structured output (a dict, a tuple, HF's ``ModelOutput``) reaches ``loss_fn`` as that
    structure (``restore`` rebuilds the model's own output type from the plain one), so
    ``outputs["logits"]`` and ``outputs.logits`` are resolved while tracing.

    The tensors loss_fn reads (class weights in a closure, an ``nn.CrossEntropyLoss``'s
    ``weight``) are read once, now, and held by the returned module as non-persistent buffers
    named ``loss_fn_constant<k>`` (the first k for which ``taken`` says no), which the graph
    reads with ``get_attr``. A parameter (a loss with learnable weights) is refused: partc
    trains the model's parameters only.
    """
    if isinstance(model_output, fx.Node):
        function, concrete = (lambda output, targets: loss_fn(output, targets)), None
    else:
        function, concrete = (lambda output, targets: loss_fn(restore(output), targets)), {"output": pytree.tree_map(lambda _: fx.PH, model_output)}
    tracer = _LossTracer()
    try:
        traced = tracer.trace(function, concrete_args=concrete)
    except Exception as e:  # noqa: BLE001
        learnable = "parameter is not a member" in str(e)
        raise TraceError(
            "loss_fn holds a parameter (a loss with learnable weights)" if learnable else f"torch.fx could not trace loss_fn: {type(e).__name__}: {_first_line(e)}",
            ErrorContext(
                pass_name="capture",
                fix="make the learnable part of the loss a module of the model, so that partc trains it" if learnable
                else "write loss_fn(outputs, targets) as plain tensor code (F.cross_entropy, ...) without control flow on values",
            ),
        ) from e
    holder = nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    lifted: dict[str, str] = {}  # the tracer's attribute -> the buffer holding it
    for node in traced.nodes:
        if node.op == "get_attr" and node.target in lifted:
            env[node] = graph.get_attr(lifted[node.target])
        elif node.op == "get_attr":
            value = operator.attrgetter(node.target)(tracer.root)
            if not isinstance(value, torch.Tensor) or value.requires_grad:
                raise TraceError(
                    f"loss_fn reads {node.target!r} ({type(value).__name__}{', which requires grad' if isinstance(value, torch.Tensor) else ''}); partc takes loss_fn(outputs, targets) with constant tensors only",
                    ErrorContext(pass_name="capture", fix="detach the tensor loss_fn reads, or make what it learns a module of the model"),
                )
            k = 0
            while taken(f"loss_fn_constant{k}") or hasattr(holder, f"loss_fn_constant{k}"):
                k += 1
            name = lifted[node.target] = f"loss_fn_constant{k}"
            holder.register_buffer(name, value.detach(), persistent=False)
            env[node] = graph.get_attr(name)
        elif node.op == "output":
            # tracing on the output's structure flattens what loss_fn returns; process_outputs restores it
            graph.output(traced.process_outputs(fx.node.map_arg(node.args[0], env.__getitem__)))
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
    return fx.GraphModule(holder, graph, class_name="LossFn")


class TracedLoss(nn.Module):
    """``loss_fn(outputs, targets)`` as a module: :func:`trace_loss_fn`'s graph module
    (``traced``, which passes may rewrite; it holds loss_fn's constant tensors) applied to
    the leaves of the model's output. It holds no parameters."""

    def __init__(self, traced: fx.GraphModule):
        super().__init__()
        self.traced = traced

    def forward(self, outputs: Any, targets: Any) -> Any:
        return self.traced(*pytree.tree_leaves(outputs), targets)


def traced_loss(gm: fx.GraphModule) -> TracedLoss | None:
    """A fresh :class:`TracedLoss` of the ``loss_fn`` that :func:`attach_loss` appended to
    ``gm`` (None when it appended none)."""
    traced = gm.meta.get(LOSS_FN_KEY)
    return None if traced is None else TracedLoss(copy.deepcopy(traced))


def _free_argument_name(wanted: str, taken: set[str]) -> str:
    """``wanted``, or ``loss_<wanted>``, ``loss_<wanted>_1``, ... when the model's forward
    already has an argument of that name (a model taking ``targets`` itself)."""
    if wanted not in taken:
        return wanted
    name, k = f"loss_{wanted}", 0
    while name in taken:
        k += 1
        name = f"loss_{wanted}_{k}"
    return name


@gc_paused()
def attach_loss(gm: fx.GraphModule, loss_fn: Callable[[Any, Any], Any], reserved: Collection[str] = ()) -> fx.GraphModule:
    """Append ``loss_fn(output, targets)`` to the captured graph, with ``targets`` a new last input.

    ``loss_fn`` is traced on its own (:func:`trace_loss_fn`; loss functions are plain tensor
    code) and spliced after the model's output, so the loss is priced, planned and placed
    like any other operator, and the targets are an input that the pipeline routes to the
    stage that computes the loss. Parameter names are untouched (no wrapper module). The
    spliced nodes are marked (``node.meta[LOSS_FN_KEY]``) and loss_fn's own graph module is
    kept in ``gm.meta[LOSS_FN_KEY]`` (:func:`traced_loss`: the loss alone, applied to the
    user's model's output). Tensors loss_fn reads (class weights) become non-persistent
    buffers ``loss_fn_constant<k>`` of ``gm`` and of that module, read at this call, named
    apart from ``gm``'s attributes and from ``reserved`` (the model's module and state-dict
    names: a buffer forward never reads is not in ``gm`` but is in the model's checkpoints).
    """
    graph = gm.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    codegen = getattr(graph, "_codegen", None)
    restore = codegen.restore if isinstance(codegen, RestoreOutputType) else (lambda plain: plain)
    loss_module = trace_loss_fn(loss_fn, output.args[0], restore, taken=lambda name: name in reserved or hasattr(gm, name))
    loss_graph = loss_module.graph
    # loss_fn's constant tensors become buffers of the model graph too (not saved in its
    # state dict), on the device of its parameters so that planning on "meta" stays there
    device = next(iter(gm.parameters()), next(iter(gm.buffers()), None))
    for name, value in loss_module.named_buffers():
        gm.register_buffer(name, value if device is None else value.to(device.device), persistent=False)
    model_outputs = [output.args[0]] if isinstance(output.args[0], fx.Node) else pytree.tree_leaves(output.args[0])
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(inputs[-1]):
        targets = graph.placeholder(_free_argument_name("targets", {str(n.target) for n in inputs}))
    loss_inputs = iter([*model_outputs, targets])  # loss_graph's placeholders, in order
    env: dict[fx.Node, Any] = {}
    loss_value = None
    with graph.inserting_before(output):
        for node in loss_graph.nodes:
            if node.op == "placeholder":
                env[node] = next(loss_inputs)
            elif node.op == "output":
                loss_value = fx.node.map_arg(node.args[0], lambda n: env[n])
            else:
                env[node] = graph.node_copy(node, lambda n: env[n])
                env[node].meta[LOSS_FN_KEY] = True
    output.args = (loss_value,)
    if isinstance(codegen, RestoreOutputType):
        graph.set_codegen(fx.graph.CodeGen())  # the graph returns the loss now
    gm.recompile()
    gm.meta[META_KEY] = replace(gm.meta[META_KEY], loss_in_graph=True)
    gm.meta[LOSS_FN_KEY] = loss_module
    return gm
