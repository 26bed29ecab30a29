"""Layouts of a tensor over one tensor-parallel mesh dimension, and the sharding rules.

Vocabulary (one tensor-parallel group of ``tp`` ranks; the printed forms follow
``torch.distributed.tensor.placement_types``)::

    S(d)  Shard(d)      every rank holds a contiguous 1/tp slice of dimension d
                        (d is non-negative: S(-1) is normalised against the tensor's rank)
    R     Replicate()   every rank holds the whole tensor
    P     Partial()     every rank holds a whole-shaped tensor; the value is their sum
    O(r)  Owned(r)      tp-rank r alone holds the whole tensor (a table-wise embedding
                        table and its lookup): a parameter is absent from the other ranks;
                        an activation is zeros there, so as a value O(r) is a P with one
                        non-zero term, which the other ranks need not receive to use it

A :class:`Strategy` is one way to run one operator: the layout each tensor input must
arrive in, the layouts of its outputs, the share of the work one device does, the
collectives it runs inside itself, and the share of its own bytes one device keeps. The
rules below list the strategies of each canonical operator kind (``passes.ir.OpKind``);
every node also keeps ``replicate`` (all R), so a plan always exists.

    linear        column (x R, W S(0), b S(0) -> S(-1)); row (x S(-1), W S(1), b P -> P);
                  batch_parallel (x S(d), W R, b R -> S(d)) for each leading d; replicate
    matmul        batch dims, rows (S(-2)), columns (S(-1)), contraction (-> P); replicate
    embedding     vocab_parallel (W S(0), masked lookup -> P; DLRM's row-wise sharding);
    embedding_bag hidden_parallel (W S(1) -> S(-1)); batch_parallel over the indices;
                  table_wise (W O(r) -> O(r): the whole table and its lookup on rank r, for
                  a weight only embeddings read); replicate. embedding_bag: mode sum or
                  mean over fixed-size bags (2-D indices, no offsets) for vocab_parallel
    einsum        one strategy per index letter: S of that letter on every operand holding
                  it (R on the others) gives S of it in the output, or P when the letter is
                  summed out (expert parallelism: the stacked experts' letter); P through
                  one operand with the others R
    topk, sort, cumsum, one_hot
                  follow S(d) of a dimension the operator does not work along
    attention     head_parallel (q, k, v S(heads) -> S(heads); query heads and k/v heads
                  must both divide); batch_parallel; replicate
    norms         follow S(d) of a dimension that is not normalised (sequence_parallel on
                  dim >= 1, batch_parallel on dim 0); replicate
    elementwise   follow S(d) through broadcasting; P flows through linear maps (add/sub of
                  partials, mul/div by a replicated operand, casts); replicate
    softmax, reductions
                  follow S(d) of a dimension that is not reduced; sum/mean over a sharded
                  dimension gives P (a mean scales its local result by 1/tp)
    views         track the sharded dimension through reshapes, permutations, expands; a
                  reshape whose sharded dimension lands on the outer dimension of its target
                  group is allowed, and a hard-coded size in its arguments is rewritten
                  (``ArgRewrite``: 12 heads -> 12/tp); any other reshape is refused
                  (:func:`view_output_layout` raises ``UnsupportedOpError`` naming the node)
    split/chunk   follow S(d) of another dimension; along the sharded dimension when every
                  piece divides (the producer must then be sharded block-wise, ``blocks``)
    cat/stack     follow S(d) of another dimension
    getitem, select, narrow, slice
                  follow S(d) of a dimension that is kept whole
    cross entropy vocab_parallel on class-sharded logits (2 all-reduces of N and 2N fp32
    nll_loss      values, no gather); batch_parallel over the samples (-> P; a "mean" over
                  class indices divides the local sum by the all-reduced count or weight sum
                  of the kept targets, torch's normaliser); replicate
    mse, l1       follow S(d) (-> P; a mean scales its local result by 1/tp); no weight=
    anything else replicate only, with a warning naming the node (``OpRule.supported``)

A dimension whose size does not divide by ``tp`` never carries S.

Resharding (:func:`reshard_cost`, ``S`` = bytes of the whole tensor)::

    S(a) -> R     all-gather(S)            P -> R      all-reduce(S)
    S(a) -> S(b)  all-to-all(S / tp)       P -> S(d)   reduce-scatter(S)
    R -> S(d)     local slice, free        R -> P      keep on tp-rank 0, zeros elsewhere, free
    S(d) -> P     zero-pad locally, free   same -> same  free
    O(r) -> R     broadcast(S)             O(r) -> P   free (the others hold zeros)
    O(r) -> S(d)  reduce-scatter(S)        (as P: the others hold zeros)

Gradients (used by the sharding ILP to price backward communication): the gradient of a
value with forward layout L must reach its producer in ``adjoint(L)`` (S(d) for S(d),
R for R and for P, O(r) for O(r): the owner alone needs it). A consumer contributes a
gradient in :func:`grad_layout`: S(d) for an S(d) input, R for a P input, O(r) for an
O(r) input (only the owner computed with it), and for an R input R when the consumer
computes redundantly (all its outputs R) or P when it computes a sharded part (a
column-parallel linear's input: Megatron's identity-forward / all-reduce-backward). The
backward collective is ``reshard(grad_layout, adjoint(L))``; into O(r): R is free (the
owner keeps its copy), P an all-reduce, S(d) an all-gather (what runs; a reduce or gather
to the owner alone would move as much through the owner's link).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Iterable, Sequence, Union

import torch
import torch.fx as fx

from partc.errors import UnsupportedOpError
from partc.passes.ir import SAVES_NOTHING, SAVES_OUTPUT, OpKind, canonical_name, error_context, op_kind

__all__ = [
    "Shard",
    "Replicate",
    "Partial",
    "Owned",
    "Layout",
    "R",
    "P",
    "Comm",
    "ArgRewrite",
    "Strategy",
    "InputRef",
    "OpRule",
    "tensor_inputs",
    "op_rule",
    "view_output_layout",
    "reshard_cost",
    "transition",
    "adjoint",
    "grad_layout",
    "local_shape",
    "local_shard",
    "saves_input",
    "is_tensor_node",
    "COLLECTIVES",
]

PASS_NAME = "sharding"


# -- layouts --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """Each rank holds a contiguous 1/tp slice of dimension ``dim`` (non-negative)."""

    dim: int

    def __post_init__(self):
        if not isinstance(self.dim, int) or self.dim < 0:
            raise ValueError(f"Shard dim must be a non-negative int (normalise with Shard.of), got {self.dim!r}")

    @staticmethod
    def of(dim: int, ndim: int) -> "Shard":
        """``Shard.of(-1, 3) == S(2)``."""
        return Shard(dim % ndim if ndim else 0)

    def __str__(self) -> str:
        return f"S({self.dim})"

    __repr__ = __str__


@dataclass(frozen=True)
class Replicate:
    """Each rank holds the whole tensor."""

    def __str__(self) -> str:
        return "R"

    __repr__ = __str__


@dataclass(frozen=True)
class Partial:
    """Each rank holds a whole-shaped tensor; the value is the sum over ranks."""

    def __str__(self) -> str:
        return "P"

    __repr__ = __str__


@dataclass(frozen=True)
class Owned:
    """Tensor-parallel rank ``rank`` alone holds the whole tensor. A parameter so laid out
    is absent from the other ranks (a table-wise embedding table); an activation is zeros
    there (the table's lookup), so its value is that of a P."""

    rank: int

    def __str__(self) -> str:
        return f"O({self.rank})"

    __repr__ = __str__


Layout = Union[Shard, Replicate, Partial, Owned]
R = Replicate()
P = Partial()


@dataclass(frozen=True)
class Comm:
    """A collective an operator runs inside itself."""

    collective: str  # "all_reduce", "all_gather", "reduce_scatter", "all_to_all"
    nbytes: int  # bytes of the whole tensor, as the CostModel conventions count them
    phase: str = "forward"  # "forward" or "backward"
    what: str = ""  # why, for the plan report


@dataclass(frozen=True)
class ArgRewrite:
    """A constant in a node's arguments the codegen must change for the local shapes.

    ``path`` indexes ``(args, kwargs)``: ``(3,)`` is ``args[3]``, ``(1, 2)`` is
    ``args[1][2]``, ``("size", 0)`` is ``kwargs["size"][0]``. A literal ``old`` becomes
    ``new``; an argument computed at run time (another node, ``old is None``) is divided
    by ``divisor`` instead.
    """

    path: tuple
    old: int | None
    new: int | None
    divisor: int

    def __str__(self) -> str:
        where = "".join(f"[{p!r}]" for p in self.path)
        return f"args{where}: {self.old} -> {self.new}" if self.old is not None else f"args{where}: // {self.divisor}"


@dataclass(frozen=True)
class Strategy:
    """One way to run one operator over the tensor-parallel group."""

    name: str  # "column", "row", "replicate", "vocab_parallel", "head_parallel", "follow", ...
    inputs: tuple[Layout | None, ...]  # one per tensor input (OpRule.inputs order); None: only dtype/shape read
    outputs: tuple[Layout, ...]  # one per output value (one for a tensor, one per element of a tuple)
    compute_factor: float = 1.0  # share of the operator's FLOPs and bytes one device does
    comm: tuple[Comm, ...] = ()  # collectives run inside the operator (vocab-parallel cross entropy)
    memory_factor: float = 1.0  # share of the node's own bytes (parameter or saved activation) one device keeps
    rewrites: tuple[ArgRewrite, ...] = ()  # hard-coded sizes to change (views, expands, splits)
    local_scale: float = 1.0  # multiply the local result by this (a mean over a sharded dim -> P)
    blocks: int = 1  # > 1: the sharded input holds this many equal blocks each sharded on its own (fused QKV)

    @property
    def output(self) -> Layout:
        return self.outputs[0]

    def __str__(self) -> str:
        ins = ", ".join("-" if l is None else str(l) for l in self.inputs)
        outs = ", ".join(str(l) for l in self.outputs)
        return f"{self.name}({ins} -> {outs})"


def adjoint(layout: Layout) -> Layout:
    """The layout a value's gradient must have at its producer."""
    return layout if isinstance(layout, (Shard, Owned)) else R


def grad_layout(input_layout: Layout | None, strategy: Strategy) -> Layout | None:
    """The layout of the gradient a consumer running ``strategy`` sends back for an input
    that arrives in ``input_layout`` (None: the input carries no gradient)."""
    if input_layout is None:
        return None
    if isinstance(input_layout, (Shard, Owned)):
        return input_layout
    if isinstance(input_layout, Partial):
        return R
    redundant = all(isinstance(o, Replicate) for o in strategy.outputs)
    return R if redundant else P


# -- resharding -----------------------------------------------------------------------------
def transition(src: Layout, dst: Layout) -> str | None:
    """The operation that turns ``src`` into ``dst``: a collective, a local op, or None."""
    if src == dst:
        return None
    if isinstance(dst, Owned):
        # into the owner's hands (gradients of an owned value): R is there already
        return None if isinstance(src, Replicate) else "all_reduce" if isinstance(src, Partial) else "all_gather" if isinstance(src, Shard) else "incompatible"
    if isinstance(src, Owned):
        # the other ranks hold zeros: a P whose sum the owner alone contributes
        return "broadcast" if isinstance(dst, Replicate) else None if isinstance(dst, Partial) else "reduce_scatter"
    if isinstance(src, Shard):
        if isinstance(dst, Replicate):
            return "all_gather"
        if isinstance(dst, Shard):
            return "all_to_all"
        return "pad"  # S -> P: place the slice in a zero tensor of the whole shape
    if isinstance(src, Partial):
        return "all_reduce" if isinstance(dst, Replicate) else "reduce_scatter"
    return "slice" if isinstance(dst, Shard) else "partial"  # R -> S, R -> P


COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")


def reshard_cost(src: Layout, dst: Layout, nbytes: float, cost_model, ranks: Sequence[int]) -> tuple[float, str | None]:
    """Seconds to turn a tensor of ``nbytes`` (whole) from ``src`` into ``dst`` on ``ranks``,
    and the collective used (None when the change is local or there is none)."""
    op = transition(src, dst)
    if op == "all_gather":
        return cost_model.all_gather(nbytes, ranks), op
    if op == "all_reduce":
        return cost_model.all_reduce(nbytes, ranks), op
    if op == "reduce_scatter":
        return cost_model.reduce_scatter(nbytes, ranks), op
    if op == "all_to_all":
        return cost_model.all_to_all(nbytes / max(len(ranks), 1), ranks), op
    if op == "broadcast":
        return cost_model.broadcast(nbytes, ranks), op
    if op == "incompatible":
        raise ValueError(f"no conversion from {src} to {dst}: an owned value moves to no other owner")
    return 0.0, None


def local_shape(shape: Sequence[int], layout: Layout, tp: int) -> tuple[int, ...]:
    shape = tuple(shape)
    if isinstance(layout, Shard):
        return shape[: layout.dim] + (shape[layout.dim] // tp,) + shape[layout.dim + 1 :]
    return shape


def local_shard(tensor: torch.Tensor, layout: Layout, rank: int, tp: int, blocks: int = 1) -> torch.Tensor:
    """The piece of the whole ``tensor`` that tensor-parallel rank ``rank`` holds.

    With ``blocks > 1`` the sharded dimension is ``blocks`` equal blocks (a fused QKV
    weight: q, k, v rows) and the rank takes its slice of each block, concatenated."""
    if isinstance(layout, Replicate):
        return tensor
    if isinstance(layout, Partial):
        return tensor if rank == 0 else torch.zeros_like(tensor)
    if isinstance(layout, Owned):
        return tensor if rank == layout.rank else tensor.narrow(0, 0, 0)  # absent: an empty slice keeps the name
    pieces = tensor.chunk(blocks, dim=layout.dim)
    return torch.cat([p.chunk(tp, dim=layout.dim)[rank] for p in pieces], dim=layout.dim)


# -- inputs of a node ---------------------------------------------------------------------------
@dataclass(frozen=True)
class InputRef:
    """One tensor input of a node: where it sits in (args, kwargs) and which value it is."""

    path: tuple  # (i,), (i, j), ("name",), ("name", j)
    node: fx.Node
    output_index: int  # element of the producer's output (0 for a plain tensor)


def _values(node: fx.Node) -> tuple[Any, ...]:
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return tuple(val)
    return (val,)


def is_tensor_node(node: fx.Node) -> bool:
    """True when the node produces a tensor or a tuple holding tensors."""
    return any(isinstance(v, torch.Tensor) for v in _values(node))


def tensor_inputs(node: fx.Node) -> tuple[InputRef, ...]:
    """The tensor inputs of ``node`` in (args, kwargs) order; Strategy.inputs follows it."""
    refs: list[InputRef] = []
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        source = node.args[0]
        if isinstance(source.meta.get("val"), (tuple, list)) and isinstance(node.args[1], int):
            if isinstance(_values(source)[node.args[1]], torch.Tensor):
                return (InputRef((0,), source, node.args[1]),)
            return ()

    def visit(arg: Any, path: tuple) -> None:
        if isinstance(arg, fx.Node):
            val = arg.meta.get("val")
            if isinstance(val, torch.Tensor):
                refs.append(InputRef(path, arg, 0))
            elif isinstance(val, (tuple, list)):
                # a tuple-valued node used whole (returned, say): one input per tensor element
                refs.extend(InputRef(path, arg, k) for k, v in enumerate(val) if isinstance(v, torch.Tensor))
        elif isinstance(arg, (tuple, list)):
            for j, a in enumerate(arg):
                visit(a, path + (j,))
        elif isinstance(arg, dict):
            for k, a in arg.items():
                visit(a, path + (k,))

    for i, a in enumerate(node.args):
        visit(a, (i,))
    for k, a in node.kwargs.items():
        visit(a, (k,))
    return tuple(refs)


def _shape(ref: InputRef) -> tuple[int, ...]:
    return tuple(int(d) for d in _values(ref.node)[ref.output_index].shape)


def _arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _path_index(refs: Sequence[InputRef], pos: int, name: str) -> int | None:
    for i, r in enumerate(refs):
        if r.path[0] == pos or r.path[0] == name:
            return i
    return None


# -- rules --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpRule:
    """What the rules allow for one node."""

    inputs: tuple[InputRef, ...]
    strategies: tuple[Strategy, ...]
    supported: bool = True  # False: no rule for this operator; it is replicated (warn and count)
    refused: tuple[str, ...] = ()  # layouts a view refused, with the reason (not errors: excluded)


class _Builder:
    """Collects the strategies of one node, dropping any that shards an indivisible dim."""

    def __init__(self, node: fx.Node, tp: int):
        self.node = node
        self.tp = tp
        self.inputs = tensor_inputs(node)
        self.in_shapes = [_shape(r) for r in self.inputs]
        self.out_values = _values(node)
        self.out_shapes = [tuple(int(d) for d in v.shape) if isinstance(v, torch.Tensor) else None for v in self.out_values]
        self.strategies: list[Strategy] = []
        self.refused: list[str] = []
        self.shape_only: set[int] = set()  # inputs read for their dtype only (type_as's other)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.out_shapes[0]

    def divides(self, size: int) -> bool:
        return size >= self.tp and size % self.tp == 0

    def _valid(self, layouts: Iterable[Layout | None], shapes: Iterable[tuple[int, ...] | None]) -> bool:
        for layout, shape in zip(layouts, shapes):
            if isinstance(layout, Shard):
                if shape is None or layout.dim >= len(shape) or not self.divides(shape[layout.dim]):
                    return False
        return True

    def add(self, name: str, inputs: Sequence[Layout | None], outputs: Sequence[Layout] | Layout, **kw: Any) -> None:
        outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,) * len(self.out_values)
        outputs = tuple(l if s is not None else R for l, s in zip(outputs, self.out_shapes))
        inputs = tuple(inputs)
        if not self._valid(inputs, self.in_shapes) or not self._valid(outputs, self.out_shapes):
            return
        sharded = any(isinstance(l, Shard) for l in inputs + outputs)
        kw.setdefault("compute_factor", 1.0 / self.tp if sharded else 1.0)
        kw.setdefault("memory_factor", 1.0 / self.tp if isinstance(outputs[0], Shard) else 1.0)
        strategy = Strategy(name, inputs, outputs, **kw)
        if all(s.inputs != strategy.inputs or s.outputs != strategy.outputs for s in self.strategies):
            self.strategies.append(strategy)

    def replicate(self) -> None:
        inputs = [None if i in self.shape_only else R for i in range(len(self.inputs))]
        self.add("replicate", inputs, R, compute_factor=1.0, memory_factor=1.0)

    def rule(self, supported: bool = True) -> OpRule:
        if not any(s.name == "replicate" for s in self.strategies):
            self.replicate()
        # replicate first: the order is the ILP's column order and the report's.
        ordered = sorted(self.strategies, key=lambda s: s.name != "replicate")
        return OpRule(self.inputs, tuple(ordered), supported, tuple(self.refused))


def op_rule(node: fx.Node, tp: int) -> OpRule | None:
    """The strategies of ``node`` over ``tp`` ranks; None for nodes without a tensor value."""
    kind = op_kind(node)
    if kind == OpKind.OUTPUT:
        refs = tensor_inputs(node)
        return OpRule(refs, (Strategy("output", (R,) * len(refs), ()),))
    if not is_tensor_node(node):
        return None
    b = _Builder(node, tp)
    name = canonical_name(node)
    if kind == OpKind.INPUT:
        b.add("input", [], R)
        return OpRule((), tuple(b.strategies))
    if kind == OpKind.PARAMETER:
        shape = b.out_shape
        b.add("replicate", [], R)
        for d in range(len(shape)):
            b.add("shard", [], Shard(d))
        if len(shape) == 2 and _owned_table_users(node):
            for r in range(tp):
                b.add("owned", [], Owned(r))
        return OpRule((), tuple(b.strategies))
    handler = _HANDLERS.get(kind) or _HANDLERS_BY_NAME.get(name)
    supported = handler is not None and handler(b, name) is not False
    if not supported:
        b.strategies.clear()
    return b.rule(supported)


# Each handler adds strategies to the builder; returning False means "no rule for this
# particular operator" (it is replicated and reported).
def _factory(b: _Builder, name: str):
    if name in ("zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like") and b.inputs:
        for d in range(len(b.out_shape)):
            b.add("follow", [Shard(d)] + [R] * (len(b.inputs) - 1), Shard(d))
    elif name in ("tril", "triu") and b.inputs:
        for d in range(len(b.out_shape) - 2):
            b.add("follow", [Shard(d)], Shard(d))
    b.replicate()


def _linear(b: _Builder, name: str):
    if name == "addmm":  # addmm(bias, x, W^T): x [N, in], mat2 [in, out]
        if len(b.inputs) != 3:
            return False
        b.add("column", [Shard(0), R, Shard(1)], Shard(1))
        b.add("row", [P, Shard(1), Shard(0)], P)
        b.add("batch_parallel", [R, Shard(0), R], Shard(0))
        return
    refs = b.inputs
    ix, iw, ib = _path_index(refs, 0, "input"), _path_index(refs, 1, "weight"), _path_index(refs, 2, "bias")
    if ix is None or iw is None or len(b.in_shapes[iw]) != 2:
        return False
    nd = len(b.out_shape)

    def layouts(x: Layout, w: Layout, bias: Layout) -> list[Layout]:
        out: list[Layout] = [R] * len(refs)
        out[ix], out[iw] = x, w
        if ib is not None:
            out[ib] = bias
        return out

    b.add("column", layouts(R, Shard(0), Shard(0)), Shard(nd - 1))
    b.add("row", layouts(Shard(len(b.in_shapes[ix]) - 1), Shard(1), P), P)
    for d in range(nd - 1):
        b.add("batch_parallel", layouts(Shard(d), R, R), Shard(d))


def _matmul(b: _Builder, name: str):
    if name == "einsum":
        return _einsum(b)
    if name not in ("matmul", "mm", "bmm") or len(b.inputs) != 2:
        return False
    a, m = b.in_shapes
    if len(a) < 2 or len(m) < 2:
        return False
    nd = len(b.out_shape)
    if len(a) == len(m):
        for d in range(nd - 2):
            if a[d] == m[d]:
                b.add("batch_parallel", [Shard(d), Shard(d)], Shard(d))
    elif len(m) == 2:
        for d in range(len(a) - 2):
            b.add("batch_parallel", [Shard(d), R], Shard(d))
    if len(a) == nd:
        b.add("row_split", [Shard(nd - 2), R], Shard(nd - 2))
        b.add("contraction", [Shard(len(a) - 1), Shard(len(m) - 2)], P)
    if len(m) == nd or len(m) == 2:
        b.add("column_split", [R, Shard(len(m) - 1)], Shard(nd - 1))


def _einsum(b: _Builder):
    """One strategy per index letter of an explicit equation (see the module docstring)."""
    equation = b.node.args[0] if b.node.args else None
    if not isinstance(equation, str) or "->" not in equation or "." in equation:
        return False
    operands, result = equation.replace(" ", "").split("->")
    operands = operands.split(",")
    if len(operands) != len(b.inputs) or any(len(set(o)) != len(o) for o in operands + [result]):
        return False  # a diagonal (repeated letter) or operands that are not plain tensors
    for letter in sorted(set("".join(operands))):
        ins = [Shard(o.index(letter)) if letter in o else R for o in operands]
        out = Shard(result.index(letter)) if letter in result else P
        b.add("contraction" if out == P else "follow", ins, out, memory_factor=1.0 if out == P else 1.0 / b.tp)
    if b.out_values[0].dtype.is_floating_point:
        for j in range(len(operands)):  # multilinear: a partial operand gives a partial result
            b.add("partial", [P if i == j else R for i in range(len(operands))], P, compute_factor=1.0)


def _owned_table_users(node: fx.Node) -> bool:
    """A 2-D parameter that only embedding lookups read, as their table: table-wise sharding
    may place it whole on one rank (nothing else would find it there)."""
    if not node.users:
        return False
    for user in node.users:
        if op_kind(user) != OpKind.EMBEDDING or isinstance(user.target, torch._ops.OpOverload) or _arg(user, 1, "weight") is not node:
            return False
    return True


def _embedding(b: _Builder, name: str):
    aten = isinstance(b.node.target, torch._ops.OpOverload)
    iw, ii = (0, 1) if aten else (1, 0)
    if len(b.inputs) < 2 or len(b.in_shapes[iw]) != 2:
        return False
    weight = b.inputs[iw].node
    if not aten and weight.op == "get_attr" and _owned_table_users(weight):
        for r in range(b.tp):  # the whole table and its lookup on rank r (DLRM's table-wise)
            owned = [R] * len(b.inputs)
            owned[iw] = Owned(r)
            b.add("table_wise", owned, Owned(r), compute_factor=1.0, memory_factor=1.0)
    if name == "embedding_bag":
        return _embedding_bag(b, iw, ii)
    padding_idx = _arg(b.node, 2, "padding_idx")
    if not aten and (b.node.kwargs.get("max_norm") is not None):
        return False  # max_norm renormalises rows in place: keep whole

    def layouts(idx: Layout, weight: Layout) -> list[Layout]:
        out: list[Layout] = [R] * len(b.inputs)
        out[iw], out[ii] = weight, idx
        return out

    nd = len(b.out_shape)
    if padding_idx is None or (aten and padding_idx == -1):
        b.add("vocab_parallel", layouts(R, Shard(0)), P, memory_factor=1.0)
    b.add("hidden_parallel", layouts(R, Shard(1)), Shard(nd - 1))
    for d in range(len(b.in_shapes[ii])):
        b.add("batch_parallel", layouts(Shard(d), R), Shard(d))


def _embedding_bag(b: _Builder, iw: int, ii: int):
    """F.embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode,
    sparse, per_sample_weights, include_last_offset, padding_idx): bags of a fixed size
    (2-D indices [B, L], no offsets) pooled to [B, D]."""
    node = b.node
    if len(b.in_shapes[ii]) != 2 or len(b.inputs) != 2 or _arg(node, 3, "max_norm") is not None:
        return False  # offsets, per-sample weights or in-place renormalisation: keep whole
    layouts = [R, R]
    mode = _arg(node, 6, "mode", "mean")
    if mode in ("sum", "mean") and _arg(node, 10, "padding_idx") is None:
        layouts[iw] = Shard(0)  # row-wise: a bag's masked lookups are partial sums of its pool
        b.add("vocab_parallel", layouts, P, memory_factor=1.0)
    layouts[iw] = Shard(1)
    b.add("hidden_parallel", layouts, Shard(1))
    layouts[iw], layouts[ii] = R, Shard(0)
    b.add("batch_parallel", layouts, Shard(0))


def _along_dim(b: _Builder, name: str):
    """Operators that work along one dim (topk, sort, cumsum): follow a shard of any other
    dim, every output alike. one_hot adds a trailing dim and follows any input dim."""
    if not b.inputs or b.inputs[0].path != (0,) or len(b.inputs) != 1:
        return False
    x = b.in_shapes[0]
    if name == "one_hot":
        for d in range(len(x)):
            b.add("follow", [Shard(d)], Shard(d))
        return
    dim = _arg(b.node, 2 if name == "topk" else 1, "dim", -1)
    if not isinstance(dim, int) or not x:
        return False
    for d in range(len(x)):
        if d != dim % len(x):
            b.add("follow", [Shard(d)], [Shard(d)] * len(b.out_values))


def _attention(b: _Builder, name: str):
    if name != "scaled_dot_product_attention" or len(b.out_values) != 1:
        return False
    q, k, v = b.in_shapes[:3]
    nd = len(q)
    if nd < 3 or len(k) != nd or len(v) != nd:
        return False
    imask = _path_index(b.inputs, 3, "attn_mask")
    head = nd - 3

    def layouts(d: int) -> list[Layout]:
        out: list[Layout] = [Shard(d)] * 3 + [R] * (len(b.inputs) - 3)
        if imask is not None:
            mask = b.in_shapes[imask]
            md = d - (nd - len(mask))
            out[imask] = Shard(md) if md >= 0 and mask[md] == q[d] and mask[md] > 1 else R
        return out

    for d in range(nd - 2):
        if k[d] != q[d] and not (d == head and b.divides(k[d])):
            continue
        if d == head:
            if b.divides(q[d]) and b.divides(k[d]):
                b.add("head_parallel", layouts(d), Shard(d))
        else:
            b.add("batch_parallel", layouts(d), Shard(d))


def _norm(b: _Builder, name: str):
    x = b.in_shapes[0] if b.inputs and b.inputs[0].path == (0,) else None
    if x is None:
        return False
    shape_arg = _arg(b.node, 1, "normalized_shape")
    if isinstance(shape_arg, int):
        shape_arg = (shape_arg,)
    if not isinstance(shape_arg, (tuple, list)):
        return False
    normed = len(shape_arg)
    for d in range(len(x) - normed):
        outs = [Shard(d) if s is not None and len(s) > d and s[d] == x[d] else R for s in b.out_shapes]
        b.add("batch_parallel" if d == 0 else "sequence_parallel", [Shard(d)] + [R] * (len(b.inputs) - 1), outs)


_LINEAR_UNARY = frozenset("neg pos float half bfloat16 double to _to_copy type_as type clone copy contiguous detach alias".split())
_ADDITIVE = frozenset("add sub iadd isub add_ sub_".split())
_MULTIPLICATIVE = frozenset("mul imul mul_ div truediv div_ itruediv".split())
_DTYPE_ONLY_SECOND = frozenset("type_as to".split())


def _elementwise(b: _Builder, name: str):
    out = b.out_shape
    if out is None:
        return False
    n_in = len(b.inputs)
    if name == "repeat":
        reps = b.node.args[1:]
        if len(reps) == 1 and isinstance(reps[0], (tuple, list)):
            reps = reps[0]
        if not reps or not all(isinstance(r, int) for r in reps):
            return False
        x = b.in_shapes[0]
        off = len(out) - len(x)
        for d in range(len(x)):
            if reps[d + off] == 1:
                b.add("follow", [Shard(d)], Shard(d + off))
        return
    if name == "repeat_interleave":
        dim = _arg(b.node, 2, "dim")
        if dim is None or n_in != 1:
            return False
        x = b.in_shapes[0]
        dim %= len(x)
        for d in range(len(x)):
            b.add("follow", [Shard(d)], Shard(d))  # along dim: each rank repeats its own rows
        return
    if name in _DTYPE_ONLY_SECOND:
        b.shape_only = set(range(1, n_in))
    shape_only = b.shape_only
    floating = isinstance(b.out_values[0], torch.Tensor) and b.out_values[0].dtype.is_floating_point

    def broadcast(d: int) -> list[Layout | None]:
        layouts: list[Layout | None] = []
        for i, shape in enumerate(b.in_shapes):
            if i in shape_only:
                layouts.append(None)
                continue
            di = d - (len(out) - len(shape))
            if di < 0 or shape[di] == 1:
                layouts.append(R)
            elif shape[di] == out[d]:
                layouts.append(Shard(di))
            else:
                return []
        return layouts

    for d in range(len(out)):
        layouts = broadcast(d)
        if layouts:
            b.add("follow", layouts, Shard(d))
    if not floating:
        return
    data = [i for i in range(n_in) if i not in shape_only]
    has_scalar = any(isinstance(a, (int, float)) and not isinstance(a, bool) for a in b.node.args)
    if name in _LINEAR_UNARY and data:
        b.add("partial", [P if i == data[0] else None if i in shape_only else R for i in range(n_in)], P, compute_factor=1.0)
    elif name in _ADDITIVE and data and not has_scalar:
        b.add("partial", [P if i in data else None for i in range(n_in)], P, compute_factor=1.0)
    elif name in _MULTIPLICATIVE and data:
        # Linear in one operand: partial numerator (or either factor) times a replicated one.
        candidates = data[:1] if name in ("div", "truediv", "div_", "itruediv") else data
        for j in candidates:
            b.add("partial", [P if i == j else R for i in range(n_in)], P, compute_factor=1.0)


def _dropout(b: _Builder, name: str):
    x = b.in_shapes[0]
    for d in range(len(x)):
        b.add("follow", [Shard(d)], Shard(d))
    p = _arg(b.node, 1, "p", 0.5)
    training = _arg(b.node, 2, "training", b.node.kwargs.get("train", True))
    if p == 0 or training is False:
        b.add("partial", [P], P, compute_factor=1.0)


def _dims_arg(node: fx.Node, ndim: int, pos: int = 1, name: str = "dim") -> tuple[int, ...] | None:
    dim = _arg(node, pos, name)
    if dim is None:
        return None
    if isinstance(dim, int):
        dim = (dim,)
    if not isinstance(dim, (tuple, list)) or not all(isinstance(d, int) for d in dim):
        return ()
    return tuple(sorted({d % ndim for d in dim})) if ndim else ()


def _softmax(b: _Builder, name: str):
    x = b.in_shapes[0]
    dims = _dims_arg(b.node, len(x))
    if not dims:
        return False
    for d in range(len(x)):
        if d not in dims:
            b.add("follow", [Shard(d)], Shard(d))


def _reduction(b: _Builder, name: str):
    if not b.inputs or b.inputs[0].path != (0,):
        return False
    x = b.in_shapes[0]
    dims = _dims_arg(b.node, len(x))
    if dims == ():
        return False
    reduced = set(range(len(x))) if dims is None else set(dims)
    keepdim = bool(_arg(b.node, 2, "keepdim", False)) and dims is not None
    linear = name in ("sum", "mean") and b.out_values[0].dtype.is_floating_point
    for d in range(len(x)):
        if d in reduced:
            if linear:
                b.add("partial_" + name, [Shard(d)], P, local_scale=1.0 / b.tp if name == "mean" else 1.0, memory_factor=1.0)
            continue
        out_d = d if keepdim else d - sum(1 for r in reduced if r < d)
        b.add("follow", [Shard(d)], Shard(out_d))
    if linear:
        b.add("partial", [P], P, compute_factor=1.0)


# Parameter names of the torch.nn.functional losses, in positional order.
LOSS_PARAMETERS = {
    "cross_entropy": ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing"),
    "nll_loss": ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction"),
    "mse_loss": ("input", "target", "size_average", "reduce", "reduction", "weight"),
    "l1_loss": ("input", "target", "size_average", "reduce", "reduction", "weight"),
    "smooth_l1_loss": ("input", "target", "size_average", "reduce", "reduction", "beta"),
}


def bind_loss_arguments(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a call of ``torch.nn.functional.<name>`` by parameter name, with
    ``reduction`` always present and resolved as torch resolves it: the deprecated
    ``size_average`` / ``reduce`` flags, when either is given, decide it (and are dropped)."""
    bound = dict(zip(LOSS_PARAMETERS[name], args))
    bound.update(kwargs)
    size_average, reduce = bound.pop("size_average", None), bound.pop("reduce", None)
    if size_average is not None or reduce is not None:
        bound["reduction"] = torch.nn._reduction.legacy_get_string(size_average, reduce, emit_warning=False)
    bound.setdefault("reduction", "mean")
    return bound


# The class-index losses, as torch.nn.functional's functions (fx graphs) and as the aten
# overloads that torch.export graphs hold. The aten ones take reduction as torch's enum
# (torch.nn._reduction.get_enum: 0 "none", 1 "mean", 2 "sum") and no legacy flags.
CLASS_LOSS_FUNCTIONS = {torch.nn.functional.cross_entropy: "cross_entropy", torch.nn.functional.nll_loss: "nll_loss"}
_ATEN_NLL_PARAMETERS = ("input", "target", "weight", "reduction", "ignore_index")
ATEN_CLASS_LOSS_PARAMETERS = {
    "cross_entropy_loss": (*_ATEN_NLL_PARAMETERS, "label_smoothing"),
    "nll_loss_nd": _ATEN_NLL_PARAMETERS,
    "nll_loss": _ATEN_NLL_PARAMETERS,
    "nll_loss2d": _ATEN_NLL_PARAMETERS,
}
_REDUCTION_NAMES = ("none", "mean", "sum")  # by torch's enum value


def class_loss_arguments(node: Any) -> dict[str, Any] | None:
    """The arguments by parameter name of a ``cross_entropy`` / ``nll_loss`` call, whichever
    frontend captured it (``F.cross_entropy``, ``aten.cross_entropy_loss.default``,
    ``aten.nll_loss_nd.default``, ...), with ``reduction`` a string as in
    :func:`bind_loss_arguments`; None when ``node`` is no such call."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if isinstance(node.target, torch._ops.OpOverload):
        parameters = ATEN_CLASS_LOSS_PARAMETERS.get(canonical_name(node))
        if parameters is None:
            return None
        bound = dict(zip(parameters, node.args))
        bound.update(node.kwargs)
        bound["reduction"] = _REDUCTION_NAMES[bound.get("reduction", 1)]
        return bound
    name = CLASS_LOSS_FUNCTIONS.get(node.target)
    return None if name is None else bind_loss_arguments(name, node.args, node.kwargs)


def holds_class_indices(node: Any, output_index: int = 0) -> bool:
    """True when ``node``'s value (its ``output_index``-th for a tuple) is known to be an
    integer tensor: a loss target of class indices, not probabilities. The one test of
    "class-index target" for planning, code generation and the global mean; a value whose
    dtype was not recorded (no fake value, no annotation) is not assumed to be one."""
    if not isinstance(node, fx.Node):
        return False
    value = _values(node)[output_index] if output_index < len(_values(node)) else None
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() and not value.is_complex()
    info = node.meta.get("partc")
    dtype = getattr(info, "dtype", None) if output_index == 0 else None
    return isinstance(dtype, torch.dtype) and not dtype.is_floating_point and not dtype.is_complex


def class_index_mean(node: Any) -> dict[str, Any] | None:
    """The arguments (:func:`class_loss_arguments`) of a ``cross_entropy`` / ``nll_loss``
    "mean" over class indices: torch divides its sum by the normaliser of the kept targets
    (``collectives.kept_target_normaliser``), not by a count fixed by the shapes. None for
    any other node."""
    bound = class_loss_arguments(node)
    if bound is None or bound["reduction"] != "mean" or not holds_class_indices(bound.get("target")):
        return None
    return bound


def sum_class_loss(node: fx.Node) -> None:
    """Rewrite the class loss ``node`` in place to ``reduction="sum"`` (the aten overloads:
    enum 2), its other arguments unchanged."""
    bound = class_loss_arguments(node)
    if bound is None:
        raise UnsupportedOpError(f"{node.format_node()} is no cross_entropy / nll_loss", error_context(node, "layouts"))
    if isinstance(node.target, torch._ops.OpOverload):
        parameters = ATEN_CLASS_LOSS_PARAMETERS[canonical_name(node)]
        node.args = tuple(bound.get(p) for p in parameters[:3])
        node.kwargs = {**{p: bound[p] for p in parameters[3:] if p in bound}, "reduction": _REDUCTION_NAMES.index("sum")}
        return
    node.args = (bound.pop("input"), bound.pop("target"))
    node.kwargs = {**bound, "reduction": "sum"}


def _loss(b: _Builder, name: str):
    if name not in LOSS_PARAMETERS or len(b.inputs) < 2 or [r.path[0] for r in b.inputs[:2]] != [0, 1]:
        return False
    if isinstance(b.node.target, torch._ops.OpOverload):
        return False  # aten loss overloads take reduction enums: replicate
    x, target = b.in_shapes[:2]
    bound = bind_loss_arguments(name, b.node.args, b.node.kwargs)
    reduction = bound["reduction"]
    if reduction not in ("mean", "sum", "none"):
        return False
    extra = len(b.inputs) - 2
    if name in ("cross_entropy", "nll_loss"):
        if x and target and x[0] == target[0]:
            _batch_parallel_class_loss(b, reduction, bound.get("weight"))
        if name == "cross_entropy" and extra == 0 and not bound.get("label_smoothing") and len(x) >= 1:
            # Target replicated, every row on every rank: "mean" divides by the count of
            # kept targets of the whole batch (collectives.vocab_parallel_cross_entropy).
            cdim = 1 if len(x) >= 2 else 0
            rows = math.prod(x) // x[cdim]
            comm = (
                Comm("all_reduce", rows * 4, "forward", "max logit per row"),
                Comm("all_reduce", 2 * rows * 4, "forward", "sum of exp and target logit per row"),
            )
            b.add("vocab_parallel", [Shard(cdim), R], R, comm=comm, compute_factor=1.0 / b.tp, memory_factor=1.0)
        return
    if x == target and extra == 0:
        # Elementwise losses without weight=: every shard holds numel / tp elements, so the
        # local mean times 1/tp is the global mean. (A weighted "mean" divides by the sum of
        # the weights, and the weights would have to be sharded too: replicated.)
        reduced = reduction != "none"
        scale = 1.0 / b.tp if reduction == "mean" else 1.0
        for d in range(len(x)):
            b.add("batch_parallel" if d == 0 else "follow", [Shard(d), Shard(d)], P if reduced else Shard(d), local_scale=scale, memory_factor=1.0 if reduced else 1.0 / b.tp)
        return
    return False


def _trainable(node: fx.Node) -> bool:
    """True when ``node``'s value depends on a parameter that requires grad, as
    passes/annotate.py recorded (planning's fake values carry no ``requires_grad``);
    without an annotation, assumed."""
    info = node.meta.get("partc")
    return True if info is None else bool(info.requires_grad)


# Bytes of the normaliser a batch-parallel class-loss "mean" all-reduces (one float64).
NORMALISER_BYTES = 8


def _batch_parallel_class_loss(b: _Builder, reduction: str, weight: Any) -> None:
    """cross_entropy / nll_loss with input and target sharded over the samples (dim 0).

    "none" gives S(0) and "sum" a P. "mean" is the delicate one. With probability targets
    (floating point) torch divides by the number of rows, the same on every rank, so 1/tp
    of the local mean is exact. With class indices torch divides by the NORMALISER: the
    number of kept targets (those not ``ignore_index``), or with ``weight=`` the sum of
    their class weights (label smoothing's term is divided by the same). A rank's own mean
    would divide by its own normaliser, and the ranks' results would not add up to the
    global mean whenever they keep different numbers of targets (padding is rarely spread
    evenly) or different weights. So the strategy carries one all-reduce of the normaliser
    (``comm``) and tp_codegen lowers it to the local ``reduction="sum"`` loss divided by
    the global normaliser (``collectives.divide_by_kept_targets``, which gives the
    normaliser no gradient, as torch does). A weight that requires grad is the exception:
    with label smoothing torch differentiates the normaliser too, so the loss is not
    offered batch-parallel then."""
    inputs = [Shard(0), Shard(0)] + [R] * (len(b.inputs) - 2)
    if reduction != "mean":
        b.add("batch_parallel", inputs, Shard(0) if reduction == "none" else P, memory_factor=1.0)
        return
    if not holds_class_indices(b.inputs[1].node, b.inputs[1].output_index):
        b.add("batch_parallel", inputs, P, local_scale=1.0 / b.tp, memory_factor=1.0)
        return
    if isinstance(weight, fx.Node) and _trainable(weight):
        return
    comm = (Comm("all_reduce", NORMALISER_BYTES, "forward", "count (or class-weight sum) of the kept targets"),)
    b.add("batch_parallel", inputs, P, comm=comm, memory_factor=1.0)


# -- views --------------------------------------------------------------------------------------
_RESHAPES = frozenset("view reshape _unsafe_view flatten unflatten unsqueeze squeeze view_as".split())
_PERMUTES = frozenset("transpose swapaxes t permute movedim".split())
_IDENTITY_VIEWS = frozenset("contiguous alias detach clone_view".split())
_EXPANDS = frozenset("expand expand_as".split())


class _Refused(Exception):
    pass


def _reshape_groups(in_shape: Sequence[int], out_shape: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Minimal runs of input and output dims with equal products (size-1 dims skipped)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while True:
        while i < len(in_shape) and in_shape[i] == 1:
            i += 1
        while j < len(out_shape) and out_shape[j] == 1:
            j += 1
        if i >= len(in_shape) or j >= len(out_shape):
            return groups
        gi, gj = [i], [j]
        pi, pj = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                if i >= len(in_shape):
                    return groups
                pi *= in_shape[i]
                gi.append(i)
                i += 1
            else:
                if j >= len(out_shape):
                    return groups
                pj *= out_shape[j]
                gj.append(j)
                j += 1
        groups.append((gi, gj))


def _shape_arg_paths(node: fx.Node, name: str, ndim_out: int) -> list[tuple[tuple, Any]] | None:
    """(path, value) of each output dim's size argument, or None when sizes are not given."""
    if name in ("view", "reshape", "_unsafe_view", "expand"):
        args = node.args[1:]
        if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
            sizes, base = list(args[0]), (1,)
        elif "size" in node.kwargs or "shape" in node.kwargs:
            key = "size" if "size" in node.kwargs else "shape"
            sizes, base = list(node.kwargs[key]), (key,)
        else:
            return [((1 + k,), a) for k, a in enumerate(args)] if len(args) == ndim_out else None
        return [(base + (k,), a) for k, a in enumerate(sizes)] if len(sizes) == ndim_out else None
    return None


def _permutation(node: fx.Node, name: str, ndim: int) -> list[int] | None:
    """perm with out dim j = in dim perm[j]."""
    perm = list(range(ndim))
    if name in ("transpose", "swapaxes"):
        d0, d1 = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
        if not isinstance(d0, int) or not isinstance(d1, int):
            return None
        d0, d1 = d0 % ndim, d1 % ndim
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    if name == "t":
        return perm[::-1] if ndim == 2 else perm
    if name == "permute":
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        dims = dims or node.kwargs.get("dims", ())
        if len(dims) != ndim or not all(isinstance(d, int) for d in dims):
            return None
        return [d % ndim for d in dims]
    if name == "movedim":
        src, dst = _arg(node, 1, "source"), _arg(node, 2, "destination")
        src = [src] if isinstance(src, int) else list(src or [])
        dst = [dst] if isinstance(dst, int) else list(dst or [])
        if len(src) != len(dst) or not all(isinstance(d, int) for d in src + dst):
            return None
        src, dst = [s % ndim for s in src], [d % ndim for d in dst]
        rest = iter(d for d in range(ndim) if d not in src)
        placed = dict(zip(dst, src))
        return [placed[j] if j in placed else next(rest) for j in range(ndim)]
    return None


def view_output_layout(node: fx.Node, layout: Layout, tp: int) -> tuple[Layout, tuple[ArgRewrite, ...]]:
    """The output layout of a view-like ``node`` whose input arrives in ``layout``, and
    the argument rewrites that keeps it correct on local shapes.

    Raises :class:`~partc.UnsupportedOpError` (naming the node, its module and source
    line) when a shard cannot pass: the sharded dimension is an inner part of a merged
    group, or lands on a target dimension that does not divide by ``tp``."""
    name = canonical_name(node)
    if not isinstance(layout, Shard) or name in _IDENTITY_VIEWS:
        return layout, ()
    in_shape = _shape(tensor_inputs(node)[0])
    out_shape = tuple(int(d) for d in _values(node)[0].shape)
    d = layout.dim
    try:
        if name in _PERMUTES:
            perm = _permutation(node, name, len(in_shape))
            if perm is None:
                raise _Refused("its permutation is not a constant")
            return Shard(perm.index(d)), ()
        if name in _EXPANDS:
            e = d + len(out_shape) - len(in_shape)
            rewrites = ()
            if name == "expand":
                paths = _shape_arg_paths(node, name, len(out_shape))
                if paths is None:
                    raise _Refused("its sizes are not readable")
                rewrites = _size_rewrite(paths[e], out_shape[e], tp)
            return Shard(e), rewrites
        if name in _RESHAPES:
            e = _reshaped_dim(in_shape, out_shape, d, tp)
            rewrites: tuple[ArgRewrite, ...] = ()
            if name in ("view", "reshape", "_unsafe_view"):
                paths = _shape_arg_paths(node, name, len(out_shape))
                if paths is None:
                    raise _Refused("its target shape is not readable")
                rewrites = _size_rewrite(paths[e], out_shape[e], tp)
            elif name == "unflatten":
                dim = _arg(node, 1, "dim") % len(in_shape)
                sizes = _arg(node, 2, "sizes")
                k = e - dim
                if 0 <= k < len(sizes):
                    rewrites = _size_rewrite(((2, k), sizes[k]), out_shape[e], tp)
            return Shard(e), rewrites
        raise _Refused(f"there is no rule for {name}")
    except _Refused as why:
        raise UnsupportedOpError(
            f"cannot shard the input of {name} on dim {d} over {tp} ranks ({in_shape} -> {out_shape}): {why}",
            error_context(
                node,
                PASS_NAME,
                fix="make the view keep the sharded dimension whole (e.g. view(B, T, n_head, head_dim) with n_head "
                "divisible by the tensor-parallel degree), or choose a degree that divides it",
            ),
        ) from None


def _reshaped_dim(in_shape, out_shape, d: int, tp: int) -> int:
    for gi, gj in _reshape_groups(in_shape, out_shape):
        if d in gi:
            if d != gi[0]:
                raise _Refused(f"dim {d} is an inner part of merged dims {gi}: every rank would hold strided pieces")
            e = gj[0]
            if out_shape[e] % tp:
                raise _Refused(f"the sharded dim maps onto target dim {e} of size {out_shape[e]}, which {tp} does not divide")
            return e
    raise _Refused("the shapes do not line up")


def _size_rewrite(path_and_value: tuple[tuple, Any], size: int, tp: int) -> tuple[ArgRewrite, ...]:
    path, value = path_and_value
    if isinstance(value, int) and not isinstance(value, bool):
        if value == -1:
            return ()
        return (ArgRewrite(path, value, value // tp, tp),)
    if isinstance(value, fx.Node):
        return (ArgRewrite(path, None, None, tp),)
    raise _Refused(f"its size argument {value!r} is neither a constant nor a traced value")


def _view(b: _Builder, name: str):
    if not b.inputs:
        return False
    x = b.in_shapes[0]
    known = name in _RESHAPES | _PERMUTES | _IDENTITY_VIEWS | _EXPANDS
    if not known:
        return False
    shape_only = [None] * (len(b.inputs) - 1)
    for d in range(len(x)):
        if not b.divides(x[d]):
            continue
        try:
            out, rewrites = view_output_layout(b.node, Shard(d), b.tp)
        except UnsupportedOpError as e:
            b.refused.append(f"S({d}): {e.message}")
            continue
        extra = [out] * len(shape_only) if name in ("view_as", "expand_as") else shape_only
        b.add("follow", [Shard(d)] + extra, out, rewrites=rewrites, compute_factor=1.0 / b.tp)
    b.add("partial", [P] + ([P] * len(shape_only) if name in ("view_as", "expand_as") else shape_only), P, compute_factor=1.0)
    b.add("replicate", [R] + ([R] * len(shape_only) if name in ("view_as", "expand_as") else shape_only), R, compute_factor=1.0)


def _index_map(node: fx.Node, in_ndim: int) -> dict[int, int] | None:
    """For basic tensor indexing x[idx]: input dim -> output dim for dims kept whole."""
    idx = node.args[1]
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(isinstance(i, fx.Node) or isinstance(i, (list, torch.Tensor)) for i in idx):
        return None
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    mapping: dict[int, int] = {}
    d_in = d_out = 0
    for i in idx:
        if i is Ellipsis:
            for _ in range(in_ndim - n_real):
                mapping[d_in] = d_out
                d_in, d_out = d_in + 1, d_out + 1
        elif i is None:
            d_out += 1
        elif isinstance(i, int):
            d_in += 1
        elif isinstance(i, slice):
            if i == slice(None):
                mapping[d_in] = d_out
            d_in, d_out = d_in + 1, d_out + 1
        else:
            return None
    while d_in < in_ndim:
        mapping[d_in] = d_out
        d_in, d_out = d_in + 1, d_out + 1
    return mapping


def _index(b: _Builder, name: str):
    node = b.node
    if name == "getitem" and b.inputs and isinstance(b.inputs[0].node.meta.get("val"), (tuple, list)):
        # picking one element of a tuple: follow that element
        shape = b.out_shape
        for d in range(len(shape)):
            b.add("follow", [Shard(d)], Shard(d), compute_factor=1.0 / b.tp)
        b.add("partial", [P], P)
        return
    if not b.inputs or b.inputs[0].path != (0,):
        return False
    x = b.in_shapes[0]
    extra = [R] * (len(b.inputs) - 1)
    if name == "getitem":
        mapping = _index_map(node, len(x))
        if mapping is None:
            return False
        for d, e in mapping.items():
            b.add("follow", [Shard(d)] + extra, Shard(e))
        if not extra:
            b.add("partial", [P], P)
        return
    if name in ("select", "narrow", "slice", "index_select"):
        dim = _arg(node, 1, "dim", 0)
        if not isinstance(dim, int):
            return False
        dim %= len(x)
        for d in range(len(x)):
            if d != dim:
                e = d - 1 if name == "select" and d > dim else d
                b.add("follow", [Shard(d)] + extra, Shard(e))
        b.add("partial", [P] + extra, P)
        return
    if name in ("gather", "take_along_dim") and len(b.inputs) == 2:
        dim = _arg(node, 1, "dim")
        if not isinstance(dim, int) or b.in_shapes[1] != b.out_shape:
            return False
        dim %= len(x)
        for d in range(len(x)):
            if d != dim and x[d] == b.out_shape[d]:
                b.add("follow", [Shard(d), Shard(d)], Shard(d))
        return
    return False


def _split(b: _Builder, name: str):
    if not b.inputs or b.inputs[0].path != (0,):
        return False
    x = b.in_shapes[0]
    default_dim = 0
    dim = _arg(b.node, 2 if name != "unbind" else 1, "dim", default_dim)
    if not isinstance(dim, int):
        return False
    dim %= len(x)
    n_out = len(b.out_values)
    for d in range(len(x)):
        if d == dim:
            continue
        e = d - 1 if name == "unbind" and d > dim else d
        b.add("follow", [Shard(d)], [Shard(e)] * n_out, memory_factor=1.0 / b.tp)
    b.add("partial", [P], [P] * n_out)
    # Along the split dim: each piece must divide; the input is then laid out in blocks,
    # which a linear layer's weight rows can provide (GPT's fused qkv -> chunk(3)).
    if name == "unbind" or not b.divides(x[dim]) or op_kind(b.inputs[0].node) != OpKind.LINEAR:
        return
    sizes = [s[dim] for s in b.out_shapes if s is not None]
    if len(set(sizes)) != 1 or not all(b.divides(s) for s in sizes):
        return
    rewrites: tuple[ArgRewrite, ...] = ()
    if name in ("split", "split_with_sizes"):
        arg = _arg(b.node, 1, "split_size_or_sections" if name == "split" else "split_sizes")
        if isinstance(arg, int):
            rewrites = (ArgRewrite((1,), arg, arg // b.tp, b.tp),)
        elif isinstance(arg, (tuple, list)) and all(isinstance(a, int) for a in arg):
            rewrites = tuple(ArgRewrite((1, k), a, a // b.tp, b.tp) for k, a in enumerate(arg))
        else:
            return
    elif name == "tensor_split":
        return
    b.add("split_sharded", [Shard(dim)], [Shard(dim)] * n_out, rewrites=rewrites, blocks=len(sizes), memory_factor=1.0 / b.tp)


def _cat(b: _Builder, name: str):
    tensors = _arg(b.node, 0, "tensors")
    if not isinstance(tensors, (tuple, list)) or len(b.inputs) != len(tensors):
        return False
    out = b.out_shape
    dim = _arg(b.node, 1, "dim", 0)
    if not isinstance(dim, int):
        return False
    dim %= len(out)
    in_nd = len(b.in_shapes[0])
    for d in range(in_nd):
        e = d if name != "stack" or d < dim else d + 1
        if name != "stack" and d == dim:
            continue
        b.add("follow", [Shard(d)] * len(b.inputs), Shard(e))
    b.add("partial", [P] * len(b.inputs), P)


def _conv(b: _Builder, name: str):
    if b.inputs and b.inputs[0].path == (0,):
        b.add("batch_parallel", [Shard(0)] + [R] * (len(b.inputs) - 1), Shard(0))


_HANDLERS = {
    OpKind.FACTORY: _factory,
    OpKind.LINEAR: _linear,
    OpKind.MATMUL: _matmul,
    OpKind.EMBEDDING: _embedding,
    OpKind.ATTENTION: _attention,
    OpKind.LAYER_NORM: _norm,
    OpKind.RMS_NORM: _norm,
    OpKind.ELEMENTWISE: _elementwise,
    OpKind.DROPOUT: _dropout,
    OpKind.SOFTMAX: _softmax,
    OpKind.REDUCTION: _reduction,
    OpKind.LOSS: _loss,
    OpKind.VIEW: _view,
    OpKind.INDEX: _index,
    OpKind.SPLIT: _split,
    OpKind.CAT: _cat,
    OpKind.CONV: _conv,
}
# Operators of no OpKind (OpKind.OTHER) that still have a rule, by canonical name.
_HANDLERS_BY_NAME = {name: _along_dim for name in ("topk", "sort", "argsort", "cumsum", "cumprod", "one_hot")}


# Inputs an operator keeps for its backward pass (as passes/annotate.py counts them). A
# gathered input that is kept must be gathered again in backward when only the producer's
# sharded copy is kept: Megatron-SP's recompute, priced by the sharding ILP.
def saves_input(node: fx.Node, ref: InputRef) -> bool:
    kind, name = op_kind(node), canonical_name(node)
    if kind == OpKind.LINEAR:
        return ref.path[0] == (1 if name == "addmm" else 0) or (name != "addmm" and ref.path[0] == "input")
    if kind in (OpKind.MATMUL, OpKind.CONV, OpKind.ATTENTION, OpKind.OTHER):
        return True
    if kind == OpKind.REDUCTION:
        return name not in ("sum", "mean")
    if kind in (OpKind.LAYER_NORM, OpKind.RMS_NORM, OpKind.BATCH_NORM, OpKind.GROUP_NORM):
        return ref.path == (0,)
    if kind == OpKind.ELEMENTWISE:
        return name not in SAVES_NOTHING and name not in SAVES_OUTPUT
    return False
