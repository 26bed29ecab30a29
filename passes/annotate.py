"""Annotate pass: what each node costs, what it keeps for backward, and which layer it is in.

Reads the shapes written by the propagate pass and writes, on every node, a frozen
:class:`~partc.passes.ir.NodeInfo` (``node.meta["partc"]``), and on the graph module a
:class:`~partc.passes.ir.GraphInfo` listing the layers. Nothing else changes.

Costs
    Forward FLOPs by operator kind (a linear layer is ``2 * out_numel * in_features``,
    attention ``4 * B * H * L * S * E`` halved when causal, pointwise ops one FLOP per
    element...). Backward FLOPs are twice the forward (2.5x for fused attention, which
    recomputes its scores), and zero for nodes nothing trainable depends on.
    ``bytes_moved`` is what the kernel reads and writes; views move nothing.

Parameters
    Parameter bytes sit on the ``get_attr`` node, once per distinct tensor object, so a
    weight tied between the embedding and the LM head is counted once.

Activations kept for backward
    Each operator declares which of its inputs (or its output) autograd saves: a linear
    layer its input, GELU its input, softmax its output, a sum nothing. Saved tensors are
    followed through views to the tensor that owns the storage and counted once on the
    node that produced it, so the input of the Q, K and V projections, saved three
    times by autograd, is counted once. Operators that save something of their own (a
    dropout mask, attention's log-sum-exp, a norm's statistics) add it to their node.

Layers
    A node belongs to the module it was called in; inside an indexed container
    (``blocks.3.attn.qkv``) the layer is the container element (``blocks.3``), elsewhere
    the top-level child (``lm_head``). Code in the root's own forward joins the layer that
    runs before it. Layers are contiguous runs in graph order; parameters and inputs join
    the layer of their first user. Each layer's structural signature hashes its operators,
    shapes and internal edges (not its names), so repeated blocks share one signature.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, replace
from typing import Any, Iterable

import torch
import torch.fx as fx

from partc.errors import ErrorContext, PartcError
from partc.passes.ir import (
    META_KEY,
    SAVES_NOTHING,
    SAVES_OUTPUT,
    AttributeReader,
    LayerInfo,
    NodeInfo,
    OpKind,
    TensorSpec,
    canonical_name,
    gc_paused,
    graph_info,
    make_node_info,
    op_kind,
    owning_module,
    user_source,
)

# Kinds that neither compute nor move data.
_FREE = frozenset({OpKind.INPUT, OpKind.PARAMETER, OpKind.OUTPUT, OpKind.VIEW, OpKind.SHAPE, OpKind.SPLIT})
# Kinds whose output aliases their first input's storage.
_ALIASING = frozenset({OpKind.VIEW, OpKind.SPLIT})
_INDEXING_VIEWS = frozenset({"getitem", "select", "slice", "narrow"})  # indexing kinds that return views
_BACKWARD_RATIO = {OpKind.ATTENTION: 2.5}


@gc_paused()
def annotate(gm: fx.GraphModule, *, reuse_from: fx.GraphModule | None = None) -> fx.GraphModule:
    """Write ``node.meta["partc"]`` on every node and the layers into ``gm.meta["partc"]``.

    ``reuse_from``: an annotated graph that ``gm`` is a copy of (the same nodes in the same
    order, reading the same parameters, propagated at other input shapes: the search's batch-1
    graph). What does not depend on shapes, each node's operator, module, layer, source line,
    whether it needs gradients and the parameter sizes, is taken from it instead of being
    worked out again."""
    nodes = list(gm.graph.nodes)
    placement = _placement(nodes) if reuse_from is None else _placement_of_copy(nodes, reuse_from)
    names, kinds, placed = placement.names, placement.kinds, placement.where
    made: dict = {}  # one TensorSpec per (shape, dtype): a block's shapes repeat in every block
    specs = {n: _specs(n.meta.get("val"), made) for n in nodes}
    tensor_args = {n: _tensor_args(n) for n in nodes}
    if reuse_from is None:
        attributes = _attributes(gm, nodes)
        requires_grad = _requires_grad(nodes, kinds, names, specs, attributes, tensor_args)
        param_numel, param_bytes = _parameter_sizes(nodes, attributes)
    else:  # dtypes, parameters and the graph are the copy's: so are gradients and sizes
        requires_grad, param_numel, param_bytes = placement.requires_grad, placement.param_numel, placement.param_bytes
    base = _storage_owners(nodes, kinds, names, specs)
    saved_extra, saved_by = _saved_for_backward(nodes, kinds, names, specs, requires_grad, base, tensor_args)

    for n in nodes:
        kind = kinds[n]
        module, module_type, layer, source = placed[n]
        fwd = _forward_flops(n, kind, names[n], specs, tensor_args[n])
        ratio = _BACKWARD_RATIO.get(kind, 2.0)
        n.meta[META_KEY] = make_node_info(
            op=kind,
            name=names[n],
            outputs=specs[n],
            fwd_flops=fwd,
            bwd_flops=int(fwd * ratio) if requires_grad[n] else 0,
            bytes_moved=_bytes_moved(n, kind, specs, tensor_args[n]),
            param_bytes=param_bytes.get(n, 0),
            param_numel=param_numel.get(n, 0),
            activation_bytes=(sum(s.nbytes for s in specs[n]) if n in saved_by else 0) + saved_extra.get(n, 0),
            requires_grad=requires_grad[n],
            module=module,
            module_type=module_type,
            layer=layer,
            source=source,
        )
    layer_of = {n: placed[n][2] for n in nodes}
    if reuse_from is None:
        signatures = lambda index, group, spec_texts: _signature(group, names, specs, spec_texts)  # noqa: E731
    else:
        traced = [layer.signature for layer in graph_info(reuse_from).layers]
        signatures = lambda index, group, spec_texts: _signature_of_copy(traced[index], group, specs, tensor_args, spec_texts)  # noqa: E731
    layers = _summarise_layers(nodes, layer_of, placement.layer_names, specs, base, signatures)
    inputs = tuple(s for n in nodes if kinds[n] == OpKind.INPUT for s in specs[n])
    gm.meta[META_KEY] = replace(graph_info(gm), layers=layers, input_specs=inputs)
    return gm


# -- what each node is and where it comes from ---------------------------------------------------
@dataclass(frozen=True)
class _Placement:
    """What each node is and where it comes from: nothing that depends on shapes."""

    names: dict[fx.Node, str]  # canonical operator names
    kinds: dict[fx.Node, OpKind]
    where: dict[fx.Node, tuple[str, str, int, str | None]]  # (module, its class, layer, source line); a parameter's module is its owner
    layer_names: list[str]
    # of a copy (_placement_of_copy), the original's: they do not depend on shapes either
    requires_grad: dict[fx.Node, bool] | None = None
    param_numel: dict[fx.Node, int] | None = None
    param_bytes: dict[fx.Node, int] | None = None


def _placement(nodes: list[fx.Node]) -> _Placement:
    names = {n: canonical_name(n) for n in nodes}
    kinds = {n: op_kind(n, names[n]) for n in nodes}
    modules = {n: owning_module(n) for n in nodes}
    layer_of, layer_names = _assign_layers(nodes, kinds, modules)
    sources: dict[str | None, str | None] = {}  # repeated blocks share source lines: parse each stack trace once
    placed = {}
    for n in nodes:
        module = (n.target.rpartition(".")[0], "") if kinds[n] == OpKind.PARAMETER else modules[n]
        trace = n.meta.get("stack_trace")
        if trace not in sources:
            sources[trace] = user_source(n)
        placed[n] = (module[0], module[1], layer_of[n], sources[trace])
    return _Placement(names, kinds, placed, layer_names)


def _placement_of_copy(nodes: list[fx.Node], original: fx.GraphModule) -> _Placement:
    """:func:`_placement` of a copy of the annotated ``original``, read from its NodeInfos."""
    originals = list(original.graph.nodes)
    if len(originals) != len(nodes) or any(a.op != b.op or a.name != b.name or a.target != b.target for a, b in zip(originals, nodes)):
        raise PartcError("annotate(reuse_from=...) needs the graph that this one is a copy of", ErrorContext(pass_name="annotate", fix="annotate the graph without reuse_from"))
    infos = {n: node_meta(a) for a, n in zip(originals, nodes)}
    names = {n: info.name for n, info in infos.items()}
    kinds = {n: info.op for n, info in infos.items()}
    placed = {n: (info.module, info.module_type, info.layer, info.source) for n, info in infos.items()}
    requires_grad = {n: info.requires_grad for n, info in infos.items()}
    param_numel = {n: info.param_numel for n, info in infos.items() if info.param_numel}
    param_bytes = {n: info.param_bytes for n, info in infos.items() if info.param_bytes}
    return _Placement(names, kinds, placed, [layer.name for layer in graph_info(original).layers], requires_grad, param_numel, param_bytes)


# -- shapes ---------------------------------------------------------------------------------
def _specs(value: Any, made: dict) -> tuple[TensorSpec, ...]:
    """The TensorSpecs of a node's value; ``made``: (shape, dtype) -> (spec,) made before
    (frozen, so shared)."""
    if isinstance(value, torch.Tensor):
        try:
            key = (value.shape, value.dtype)
            found = made.get(key)
        except TypeError:  # a symbolic size cannot be hashed
            return (TensorSpec(tuple(int(d) for d in value.shape), value.dtype),)
        if found is None:
            found = made[key] = (TensorSpec(tuple(int(d) for d in value.shape), value.dtype),)
        return found
    if isinstance(value, (tuple, list)):
        return tuple(s for v in value for s in _specs(v, made))
    return ()


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    """Node arguments (flattened through lists), in order."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def _first_spec(node: Any, specs) -> TensorSpec | None:
    return specs[node][0] if isinstance(node, fx.Node) and specs.get(node) else None


# -- gradients and parameters ---------------------------------------------------------------
_DETACHING = frozenset(("detach", "argmax", "argmin"))  # outputs no gradient flows through
_NO_GRADIENT_KINDS = frozenset((OpKind.INPUT, OpKind.FACTORY, OpKind.SHAPE))


def _requires_grad(nodes, kinds, names, specs, attributes, tensor_args) -> dict[fx.Node, bool]:
    result: dict[fx.Node, bool] = {}
    for n in nodes:
        floating = bool(specs[n]) and specs[n][0].dtype.is_floating_point
        if kinds[n] == OpKind.PARAMETER:
            result[n] = floating and bool(getattr(attributes[n], "requires_grad", False))
        elif kinds[n] in _NO_GRADIENT_KINDS or names[n] in _DETACHING:
            result[n] = False
        else:
            result[n] = floating and any(map(result.get, tensor_args[n]))  # (an input not seen yet: None)
    return result


def _attributes(gm: fx.GraphModule, nodes) -> dict[fx.Node, Any]:
    """What each get_attr node reads (``gm.<target>``)."""
    read = AttributeReader(gm)
    return {n: read(n.target) for n in nodes if n.op == "get_attr"}


def _parameter_sizes(nodes, attributes) -> tuple[dict[fx.Node, int], dict[fx.Node, int]]:
    """Trainable elements and bytes per get_attr node; a tensor reached twice counts once."""
    seen: set[int] = set()
    numel: dict[fx.Node, int] = {}
    nbytes: dict[fx.Node, int] = {}
    for n in nodes:
        if n.op != "get_attr":
            continue
        tensor = attributes[n]
        if not isinstance(tensor, torch.Tensor) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        nbytes[n] = tensor.numel() * tensor.element_size()
        if isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad:
            numel[n] = tensor.numel()
    return numel, nbytes


# -- FLOPs and bytes --------------------------------------------------------------------------
def _forward_flops(node: fx.Node, kind: OpKind, name: str, specs, tensor_args: list[fx.Node]) -> int:
    out = specs[node]
    if kind in _FREE or kind in (OpKind.INDEX, OpKind.CAT, OpKind.FACTORY, OpKind.EMBEDDING) or not out:
        return 0
    out_numel = out[0].numel
    args = node.args
    if kind == OpKind.LINEAR:
        x = _first_spec(args[1] if name == "addmm" else args[0], specs)
        has_bias = name == "addmm" or (len(args) > 2 and args[2] is not None) or node.kwargs.get("bias") is not None
        return 2 * out_numel * (x.shape[-1] if x and x.shape else 1) + (out_numel if has_bias else 0)
    if kind == OpKind.MATMUL:
        if name == "einsum":
            return _einsum_flops(args[0], [_first_spec(a, specs) for a in tensor_args])
        a = _first_spec(args[1] if name == "baddbmm" else args[0], specs)
        return 2 * out_numel * (a.shape[-1] if a and a.shape else 1)
    if kind == OpKind.ATTENTION:
        q, k, v = (_first_spec(a, specs) for a in args[:3])
        batch_heads = math.prod(q.shape[:-2])
        flops = 2 * batch_heads * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        causal = node.kwargs.get("is_causal", args[5] if len(args) > 5 else False)
        return flops // 2 if causal is True else flops
    if kind == OpKind.CONV:
        weight = _first_spec(args[1], specs)
        return 2 * out_numel * math.prod(weight.shape[1:]) if weight else out_numel
    if kind in (OpKind.LAYER_NORM, OpKind.RMS_NORM, OpKind.BATCH_NORM, OpKind.GROUP_NORM, OpKind.SOFTMAX):
        return 5 * out_numel
    if kind in (OpKind.REDUCTION, OpKind.LOSS):
        x = _first_spec(args[0], specs)
        return (5 if kind == OpKind.LOSS else 1) * (x.numel if x else out_numel)
    return out_numel  # pointwise, dropout, unknown


def _einsum_flops(equation: Any, operands: list[TensorSpec | None]) -> int:
    if not isinstance(equation, str) or None in operands:
        return 0
    sizes: dict[str, int] = {}
    for term, spec in zip(equation.split("->")[0].split(","), operands):
        for letter, dim in zip(term.strip(), spec.shape):
            sizes[letter] = dim
    return 2 * math.prod(sizes.values())


def _bytes_moved(node: fx.Node, kind: OpKind, specs, tensor_args: list[fx.Node]) -> int:
    if kind in _FREE:
        return 0
    if kind == OpKind.EMBEDDING:  # a lookup reads the indices and the rows it gathers, not the whole table
        inputs = [specs[a][0] for a in tensor_args if specs.get(a)]
        tables = [s for s in inputs if s.dtype.is_floating_point and len(s.shape) == 2]
        indices = [s for s in inputs if not s.dtype.is_floating_point]
        if len(tables) == 1 and indices:
            rows = indices[0].numel * tables[0].shape[1] * tables[0].dtype.itemsize
            return indices[0].nbytes + rows + sum(s.nbytes for s in specs[node])
    read = sum(specs[a][0].nbytes for a in tensor_args if specs.get(a))
    return read + sum(s.nbytes for s in specs[node])


# -- activations saved for backward -----------------------------------------------------------
def _storage_owners(nodes, kinds, names, specs) -> dict[fx.Node, fx.Node]:
    """For every tensor node, the node that allocated its storage (views share their base's)."""
    base: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        base[n] = n
        kind = kinds[n]
        if kind in _ALIASING or (kind == OpKind.INDEX and names[n] in _INDEXING_VIEWS):
            args = n.args
            source = args[0] if args and isinstance(args[0], fx.Node) else None
            if source is not None and source in kinds and _is_view_source(source, kinds, specs):
                owner = base.get(source, source)
                if _shares_storage(n, owner):
                    base[n] = owner
    return base


def _shares_storage(node: fx.Node, owner: fx.Node) -> bool:
    # reshape and contiguous copy a non-contiguous input: the copy owns its storage.
    # The fake tensors from propagate alias exactly as the real ones would.
    out, src = _first_tensor(node.meta.get("val")), _first_tensor(owner.meta.get("val"))
    return out is None or src is None or torch._C._is_alias_of(out, src)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, (tuple, list)):
        value = value[0] if value else None
    return value if isinstance(value, torch.Tensor) else None


def _is_view_source(source: fx.Node, kinds, specs) -> bool:
    # getitem on the tuple result of a non-split op (export's native_layer_norm) picks a
    # fresh tensor, not a view.
    return isinstance(source.meta.get("val"), torch.Tensor) or kinds[source] == OpKind.SPLIT


def _saved_for_backward(nodes, kinds, names, specs, requires_grad, base, tensor_args):
    """(extra bytes each node saves of its own, the set of storage owners autograd keeps)."""
    extra: dict[fx.Node, int] = {}
    kept: set[fx.Node] = set()

    def keep(values: Iterable[Any]) -> None:
        for v in values:
            if isinstance(v, fx.Node) and kinds[v] != OpKind.PARAMETER and specs.get(v):
                owner = base[v]
                if kinds[owner] != OpKind.PARAMETER:
                    kept.add(owner)

    for n in nodes:
        if not requires_grad[n] or not specs[n]:
            continue
        kind, name, args = kinds[n], names[n], n.args
        out = specs[n][0]
        tensors = tensor_args[n]
        if kind == OpKind.LINEAR:
            keep([args[1] if name == "addmm" else args[0]])
        elif kind in (OpKind.MATMUL, OpKind.CONV, OpKind.REDUCTION, OpKind.OTHER) and name not in ("sum", "mean"):
            keep(tensors)
        elif kind == OpKind.ATTENTION:
            keep(list(args[:3]) + [n])
            extra[n] = math.prod(out.shape[:-1]) * 4  # fp32 log-sum-exp per query row
        elif kind in (OpKind.LAYER_NORM, OpKind.RMS_NORM, OpKind.GROUP_NORM, OpKind.BATCH_NORM):
            keep(args[:1])
            extra[n] = 2 * 4 * math.prod(out.shape[:-1])  # fp32 mean and rstd per row
        elif kind == OpKind.SOFTMAX or name in SAVES_OUTPUT:
            keep([n])
        elif kind == OpKind.DROPOUT:
            p = n.kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            extra[n] = out.numel if isinstance(p, (int, float)) and p > 0 else 0  # bool mask
        elif kind == OpKind.LOSS:
            keep(tensors[1:2])  # targets
            logits = _first_spec(args[0], specs)
            extra[n] = logits.nbytes if logits else 0  # log-softmax of the logits
        elif kind == OpKind.EMBEDDING:
            keep([a for a in tensors if specs[a] and not specs[a][0].dtype.is_floating_point])
        elif kind == OpKind.ELEMENTWISE and name not in SAVES_NOTHING:
            keep(tensors)
    return extra, kept


# -- layers -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1 << 14)  # a block's nodes share their modules' paths
def layer_key(module_path: str) -> str | None:
    """'blocks.3.attn.qkv' -> 'blocks.3'; 'lm_head' -> 'lm_head'; '' -> None."""
    if not module_path:
        return None
    parts = module_path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def _assign_layers(nodes, kinds, modules) -> tuple[dict[fx.Node, int], list[str]]:
    layer_of: dict[fx.Node, int] = {}
    layer_names: list[str] = []
    current_key: str | None = None
    for n in nodes:
        if kinds[n] in (OpKind.INPUT, OpKind.PARAMETER, OpKind.OUTPUT):
            continue
        key = layer_key(modules[n][0])
        if not layer_names or (key is not None and key != current_key):
            layer_names.append(key or "<root>")
            current_key = key
        layer_of[n] = len(layer_names) - 1
    if not layer_names:
        layer_names.append("<root>")
    last = len(layer_names) - 1
    for n in nodes:
        if n in layer_of:
            continue
        if kinds[n] == OpKind.OUTPUT:
            layer_of[n] = last
        else:  # inputs and parameters live where they are first used
            users = [layer_of[u] for u in n.users if u in layer_of]
            layer_of[n] = min(users) if users else 0
    return layer_of, layer_names


def _summarise_layers(nodes, layer_of, layer_names, specs, base, signatures) -> tuple[LayerInfo, ...]:
    """Each layer's totals; ``signatures(index, nodes, spec_texts)`` gives its signature."""
    members: list[list[fx.Node]] = [[] for _ in layer_names]
    for n in nodes:
        members[layer_of[n]].append(n)
    layers = []
    spec_texts: dict[tuple[TensorSpec, ...], str] = {}
    for index, group in enumerate(members):
        infos = [node_meta(n) for n in group]
        crossing = {base[n] for n in group if any(layer_of[u] > index for u in n.users) and node_meta(n).op not in (OpKind.PARAMETER,)}
        layers.append(
            LayerInfo(
                index=index,
                name=layer_names[index],
                nodes=tuple(n.name for n in group),
                signature=signatures(index, group, spec_texts),
                fwd_flops=sum(i.fwd_flops for i in infos),
                bwd_flops=sum(i.bwd_flops for i in infos),
                bytes_moved=sum(i.bytes_moved for i in infos),
                param_bytes=sum(i.param_bytes for i in infos),
                param_numel=sum(i.param_numel for i in infos),
                activation_bytes=sum(i.activation_bytes for i in infos),
                output_bytes=sum(s.nbytes for owner in crossing for s in specs[owner]),
            )
        )
    return tuple(layers)


def node_meta(node: fx.Node) -> NodeInfo:
    return node.meta[META_KEY]


_ATOMS = frozenset((int, float, bool, str, type(None)))  # constants whose text is their repr's repr


def _signature(group: list[fx.Node], names, specs, spec_texts: dict) -> str:
    """A hash of the layer's structure: operators, shapes, constants and internal edges.
    ``spec_texts``: specs -> their text, filled as it goes (shapes repeat across layers)."""
    # The model's inputs join the first layer that reads them; like any value from outside
    # the layer they are not its structure, so blocks.0 hashes like blocks.1.
    group = [n for n in group if n.op != "placeholder"]
    spec_text = functools.partial(_spec_text, texts=spec_texts)
    label = {n: repr(f"#{i}") for i, n in enumerate(group)}  # a node's text: its position, or (below) its specs

    def describe(arg: Any) -> str:
        """The text of an argument: a node as its position in the layer (or its specs when
        it is from outside), containers as lists and dicts of those, sorted by key,
        constants by repr, all written as ``str`` writes lists and dicts of strings."""
        if type(arg) in _ATOMS:  # the common constants first: the same text as below
            return repr(repr(arg))
        if isinstance(arg, fx.Node):
            found = label.get(arg)
            if found is None:
                found = label[arg] = repr(f"ext{spec_text(specs[arg])}")
            return found
        if isinstance(arg, (tuple, list)):
            return "[" + ", ".join([describe(a) for a in arg]) + "]"
        if isinstance(arg, dict):
            return "{" + ", ".join([f"{k!r}: {describe(v)}" for k, v in sorted(arg.items())]) + "}"
        return repr(repr(arg))

    # one update of the concatenation: the same digest as one update per node
    text = "".join(f"{n.op}|{names[n]}|{spec_text(specs[n])}|{describe(n.args)}|{describe(n.kwargs) if n.kwargs else '{}'}" for n in group)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _signature_of_copy(traced: str, group: list[fx.Node], specs, tensor_args, spec_texts: dict) -> str:
    """The signature of a layer of a copy (``annotate(reuse_from=...)``): its signature in
    the original (operators, constants, internal edges and the shapes there) with the shapes
    here, of its nodes and of the values it reads from outside, in the order it reads them.
    Layers with equal signatures here have equal ones by :func:`_signature`; the converse
    fails only for layers whose shapes differ in the original alone (a fixed table of the
    traced batch's rows), which are then kept apart: never layers that differ grouped."""
    group = [n for n in group if n.op != "placeholder"]  # inputs are read from outside, as in _signature
    inside = set(group)
    texts = [traced]
    for n in group:
        texts.append(_spec_text(specs[n], spec_texts))
        texts += ["ext" + _spec_text(specs[a], spec_texts) for a in tensor_args[n] if a not in inside]
    return hashlib.sha1("|".join(texts).encode()).hexdigest()[:16]


def _spec_text(specs: tuple[TensorSpec, ...], texts: dict) -> str:
    """``specs`` as text, kept in ``texts`` (specs -> text: shapes repeat across layers)."""
    found = texts.get(specs)
    if found is None:
        found = texts[specs] = ",".join(str(s) for s in specs)
    return found
