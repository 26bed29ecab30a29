"""partc's intermediate representation: a torch.fx graph plus one frozen record per node.

Both frontends (``torch.fx`` symbolic tracing and ``torch.export``) produce fx graphs, but
their targets differ: ``F.linear`` or ``torch.matmul`` or ``operator.add`` on one side,
``aten.linear.default`` or ``aten.add.Tensor`` on the other, and methods such as
``x.view(...)`` only on the first. :func:`canonical_name` strips a target down to the
operator's name (``"linear"``, ``"add"``, ``"view"``), and :func:`op_kind` maps that name onto
the small vocabulary :class:`OpKind` that every later pass reasons about. Arguments keep
the positions of the torch-level functions (``aten.linear(input, weight, bias)`` and
``F.linear(input, weight, bias)`` agree), which is what lets later passes read them one way.

Analysis passes write a :class:`NodeInfo` into ``node.meta["partc"]`` and a
:class:`GraphInfo` into ``graph_module.meta["partc"]``; both are frozen, so a pass that
refines them uses :func:`dataclasses.replace` and writes the new value back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import gc
import operator
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from partc.errors import ErrorContext

# UncompiledGraphModule: a GraphModule that generates its Python code when it is first run
# (or its ``.code`` read, or it is printed or pickled), not each time it is made or
# recompiled. Generating and compiling the code of a 96-layer GPT-3 (3,668 nodes) costs
# ~0.1 s, and planning never runs the captured graph: every pass reads its nodes.
try:  # torch >= 2.3
    from torch.fx._lazy_graph_module import _LazyGraphModule as UncompiledGraphModule
except ImportError:  # pragma: no cover
    UncompiledGraphModule = fx.GraphModule

META_KEY = "partc"


class OpKind(enum.Enum):
    """The canonical operator vocabulary."""

    # Members are singletons compared by identity: hash them by identity too, in C, instead
    # of Enum's Python-level hash of the name (the passes test kinds against sets and key
    # dicts by them tens of thousands of times per plan).
    __hash__ = object.__hash__

    INPUT = "input"  # a placeholder: a user input
    PARAMETER = "parameter"  # a get_attr of a parameter, buffer or constant
    OUTPUT = "output"
    LINEAR = "linear"  # x @ W^T (+ b): F.linear, aten.linear, addmm
    MATMUL = "matmul"  # activation x activation: matmul, bmm, mm, einsum
    EMBEDDING = "embedding"
    ATTENTION = "attention"  # fused scaled dot-product attention
    CONV = "conv"
    LAYER_NORM = "layer_norm"
    RMS_NORM = "rms_norm"
    BATCH_NORM = "batch_norm"
    GROUP_NORM = "group_norm"
    SOFTMAX = "softmax"
    ELEMENTWISE = "elementwise"  # pointwise maths, activations, casts
    DROPOUT = "dropout"
    REDUCTION = "reduction"  # sum, mean, max, ...
    LOSS = "loss"  # cross entropy, mse, ...
    VIEW = "view"  # reshapes and permutations that move no data
    INDEX = "index"  # getitem, slicing, select, gather
    SPLIT = "split"  # split, chunk, unbind
    CAT = "cat"  # cat, stack
    FACTORY = "factory"  # arange, zeros, ones, full: tensors made inside forward
    SHAPE = "shape"  # size(), dim(): Python values about shapes
    OTHER = "other"  # no rule: later passes replicate it and say so


_KIND_OF_NAME: dict[str, OpKind] = {}


def _register(kind: OpKind, names: str) -> None:
    for name in names.split():
        _KIND_OF_NAME[name] = kind


_register(OpKind.LINEAR, "linear addmm")
_register(OpKind.MATMUL, "matmul mm bmm baddbmm einsum")
_register(OpKind.EMBEDDING, "embedding embedding_bag")
_register(OpKind.ATTENTION, "scaled_dot_product_attention _scaled_dot_product_flash_attention _scaled_dot_product_efficient_attention")
_register(OpKind.CONV, "conv1d conv2d conv3d convolution conv_transpose1d conv_transpose2d")
_register(OpKind.LAYER_NORM, "layer_norm native_layer_norm")
_register(OpKind.RMS_NORM, "rms_norm _fused_rms_norm")
_register(OpKind.BATCH_NORM, "batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training _native_batch_norm_legit_functional native_batch_norm")
_register(OpKind.GROUP_NORM, "group_norm native_group_norm")
_register(OpKind.SOFTMAX, "softmax log_softmax _softmax _log_softmax")
_register(OpKind.DROPOUT, "dropout native_dropout feature_dropout dropout1d dropout2d")
_register(OpKind.REDUCTION, "sum mean amax amin max min argmax argmin var std var_mean logsumexp norm prod all any")
_register(OpKind.LOSS, "cross_entropy cross_entropy_loss nll_loss nll_loss_nd mse_loss l1_loss binary_cross_entropy binary_cross_entropy_with_logits smooth_l1_loss")
_register(OpKind.VIEW, "view reshape _unsafe_view flatten unflatten unsqueeze squeeze expand expand_as permute transpose t contiguous view_as alias detach clone_view movedim swapaxes")
_register(OpKind.INDEX, "getitem select slice narrow index index_select gather take_along_dim")
_register(OpKind.SPLIT, "split split_with_sizes chunk unbind tensor_split")
_register(OpKind.CAT, "cat concat concatenate stack")
_register(OpKind.FACTORY, "arange zeros ones full empty zeros_like ones_like full_like empty_like rand randn tensor scalar_tensor lift_fresh_copy tril triu")
_register(OpKind.FACTORY, "new_ones new_zeros new_full new_empty")  # x.new_ones(shape): only x's dtype and device are read
_register(OpKind.SHAPE, "size dim numel getattr sym_size _assert_tensor_metadata _assert_scalar sym_constrain_range_for_size")
_register(
    OpKind.ELEMENTWISE,
    """add sub mul div truediv floordiv neg pos pow rsqrt sqrt exp log log1p tanh sigmoid relu gelu silu
    mish softplus elu leaky_relu hardtanh hardswish hardsigmoid relu6 abs sign cos sin erf clamp clamp_min clamp_max
    where masked_fill float half bfloat16 double int long bool to type_as type _to_copy clone copy
    reciprocal mod remainder eq ne lt le gt ge logical_not logical_and logical_or bitwise_and bitwise_or __and__ __or__
    maximum minimum square addcmul addcdiv lerp repeat repeat_interleave fill zero_ iadd imul isub itruediv
    add_ mul_ sub_ div_ copy_ masked_fill_ relu_ gelu_ silu_ sigmoid_ tanh_ neg_ exp_ pow_ fill_""",
)

# Operators whose backward needs their own output (not their input).
SAVES_OUTPUT = frozenset("relu relu_ sigmoid sigmoid_ tanh tanh_ exp exp_ softmax _softmax log_softmax _log_softmax rsqrt sqrt".split())
# Pointwise operators that are linear in each input: their backward saves nothing.
SAVES_NOTHING = frozenset(
    """add sub neg pos float half bfloat16 double to type_as type _to_copy clone copy add_ sub_ iadd isub
    repeat repeat_interleave fill zero_ fill_ copy_ masked_fill masked_fill_ where""".split()
)


def canonical_name(node: fx.Node) -> str:
    """The operator's bare name: ``F.linear``, ``aten.linear.default`` -> ``"linear"``."""
    target = node.target
    if node.op == "call_method":
        return str(target)
    if node.op != "call_function":
        return node.op
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    if target is operator.getitem:
        return "getitem"
    name = getattr(target, "__name__", None) or str(target)
    return name.removeprefix("_operator.")


def op_kind(node: fx.Node, name: str | None = None) -> OpKind:
    """``node``'s kind; ``name``: its :func:`canonical_name`, when already known."""
    if node.op == "placeholder":
        return OpKind.INPUT
    if node.op == "get_attr":
        return OpKind.PARAMETER
    if node.op == "output":
        return OpKind.OUTPUT
    if node.op == "call_module":
        # Captured graphs trace through every module; a call_module only survives in a
        # graph built by hand. Name it so it is visible, price it as unknown.
        return OpKind.OTHER
    return _KIND_OF_NAME.get(canonical_name(node) if name is None else name, OpKind.OTHER)


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor value."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    # worked out once per spec (the passes read them thousands of times; specs are shared)
    @functools.cached_property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @functools.cached_property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __str__(self) -> str:
        return self.text

    @functools.cached_property
    def text(self) -> str:
        """``bfloat16[8, 2048, 768]``"""
        return f"{str(self.dtype).removeprefix('torch.')}[{', '.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class NodeInfo:
    """What the annotate pass knows about one fx node (``node.meta["partc"]``)."""

    op: OpKind
    name: str  # canonical operator name ("linear", "view", ...)
    outputs: tuple[TensorSpec, ...]  # one per tensor the node produces; empty for Python values
    fwd_flops: int  # floating-point operations of the forward pass
    bwd_flops: int  # ... of the backward pass (0 when nothing upstream needs gradients)
    bytes_moved: int  # bytes read + written by the forward kernel (0 for views)
    param_bytes: int  # parameter/buffer bytes first owned here (tied tensors counted once)
    param_numel: int  # elements of the trainable parameters owned here
    activation_bytes: int  # bytes of this node's output kept alive for the backward pass
    requires_grad: bool  # the output depends on a trainable parameter
    module: str  # qualified name of the innermost owning nn.Module ("" = the root)
    module_type: str  # its class name
    layer: int  # index into GraphInfo.layers
    source: str | None  # "file.py:LINE  code" of the user's source line, when known

    @property
    def shape(self) -> tuple[int, ...] | None:
        return self.outputs[0].shape if self.outputs else None

    @property
    def dtype(self) -> torch.dtype | None:
        return self.outputs[0].dtype if self.outputs else None


_NODE_INFO_FIELDS = frozenset(f.name for f in dataclasses.fields(NodeInfo))


def make_node_info(**fields: Any) -> NodeInfo:
    """``NodeInfo(**fields)`` (every field, by keyword) in half the time: a frozen
    dataclass's ``__init__`` sets each field through ``object.__setattr__`` (2.4 us for
    NodeInfo's 14), here the instance's ``__dict__`` takes them at once (1.1 us). annotate
    makes one per node, twice per plan (the search's batch-1 graph)."""
    if fields.keys() != _NODE_INFO_FIELDS:
        raise TypeError(f"NodeInfo fields missing or unknown: {sorted(fields.keys() ^ _NODE_INFO_FIELDS)}")
    info = object.__new__(NodeInfo)
    info.__dict__.update(fields)
    return info


@dataclass(frozen=True)
class LayerInfo:
    """A contiguous group of nodes, such as one transformer block."""

    index: int
    name: str  # the module that owns the group ("blocks.3", "wte", "lm_head")
    nodes: tuple[str, ...]  # fx node names, in graph order
    signature: str  # structural hash; equal signatures mean identical blocks
    fwd_flops: int
    bwd_flops: int
    bytes_moved: int
    param_bytes: int
    param_numel: int
    activation_bytes: int
    output_bytes: int  # bytes of this layer's values that later layers read (a cut's transfer)


FX_FRONTEND = "fx.symbolic_trace"  # the graph is the model's own Python, traced
EXPORT_FRONTEND = "torch.export"  # the graph torch.export recorded (shape branches frozen)


@dataclass(frozen=True)
class GraphInfo:
    """Graph-level facts (``graph_module.meta["partc"]``)."""

    frontend: str  # FX_FRONTEND or EXPORT_FRONTEND
    fallback_reason: str | None = None  # why symbolic tracing was not used
    input_specs: tuple[TensorSpec, ...] = ()
    layers: tuple[LayerInfo, ...] = ()
    mutated_buffers: tuple[str, ...] = ()  # buffers the forward writes (BatchNorm stats)
    loss_in_graph: bool = False  # the graph ends in loss_fn(output, targets); targets is its last input


def node_info(node: fx.Node) -> NodeInfo:
    return node.meta[META_KEY]


def graph_info(gm: fx.GraphModule) -> GraphInfo:
    return gm.meta[META_KEY]


# -- where a node came from -----------------------------------------------------------------
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)(?:\n(?!\s*File )(?P<code>[^\n]*))?')
_LIBRARY_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(__file__))


def is_library_file(path: str) -> bool:
    """True for torch's and partc's own pass files (never the user's source)."""
    return os.path.abspath(path).startswith(_LIBRARY_DIRS)


def user_source(node: fx.Node) -> str | None:
    """The innermost line of the user's code that produced ``node``, as "file.py:LINE  code"."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    frames = [m for m in _FRAME.finditer(trace) if not is_library_file(m["file"])]
    if not frames:
        return None
    last = frames[-1]
    return f"{os.path.basename(last['file'])}:{last['line']}  {(last['code'] or '').strip()}".rstrip()


# torch.export's marker for a node made outside any module call (a size read from an input
# in the root's forward): it stands for the root module.
_EMPTY_MODULE_STACK = "_empty_nn_module_stack_from_metadata_hook"


def owning_module(node: fx.Node) -> tuple[str, str]:
    """(qualified name, class name) of the innermost module whose forward made ``node``."""
    for key, entry in reversed((node.meta.get("nn_module_stack") or {}).items()):
        if key != _EMPTY_MODULE_STACK:
            try:
                return _module_names(entry)
            except TypeError:  # an entry that cannot be hashed (a list): worked out each time
                return _module_names.__wrapped__(entry)
    return "", ""


@functools.lru_cache(maxsize=1 << 14)  # a block's nodes share their modules
def _module_names(entry: tuple[str, type | str]) -> tuple[str, str]:
    """(qualified name, class name) of an ``nn_module_stack`` entry (path, class or its name)."""
    path, module_type = entry
    type_name = module_type if isinstance(module_type, str) else module_type.__qualname__
    return path, type_name.rsplit(".", 1)[-1]


class AttributeReader:
    """``reader(target)`` is ``gm.<target>`` (``operator.attrgetter``), with each owning
    module looked up once: the parameters of a block sit in a few modules five levels deep,
    and nn.Module's attribute lookup is Python code."""

    def __init__(self, gm: torch.nn.Module):
        self.gm = gm
        self.owners: dict[str, object] = {"": gm}

    def __call__(self, target: str) -> object:
        prefix, _, field = target.rpartition(".")
        owner = self.owners.get(prefix)
        if owner is None:
            owner = self.owners[prefix] = operator.attrgetter(prefix)(self.gm)
        return getattr(owner, field)


def error_context(node: fx.Node, pass_name: str, fix: str | None = None) -> ErrorContext:
    """Everything an error message should say about ``node``."""
    module, _ = owning_module(node)
    return ErrorContext(pass_name=pass_name, node=node.format_node(), module=module, source=user_source(node), fix=fix)


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off for a pass, or for a whole plan (a context
    manager or a decorator; nested, only the outermost turns it back on).

    Passes allocate hundreds of thousands of small objects (fx nodes, fake tensors, cost
    records); each full collection walks every live one, and a large model's graph makes
    them frequent and slow (0.6 s of 4.5 s planning a 96-layer GPT-3, nothing at 12 layers).
    Objects freed by reference counting are freed as usual; cycles wait until the pause ends,
    which collects the young objects then and there (the collection those allocations are
    due), not at whatever allocation of the caller's comes next. A pass's end so walks what
    it made and later collections walk it again: ``partc.plan`` pauses once around all of
    its passes."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
            gc.collect(0)
