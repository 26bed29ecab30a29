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

import functools
import inspect
import keyword
import linecache
import operator
import sys
import traceback
import warnings
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from partc.errors import ErrorContext, TraceError
from partc.passes.ir import META_KEY, GraphInfo, error_context, gc_paused, is_library_file

FRONTENDS = ("auto", "fx", "export")


class _TraceThroughModules(fx.Tracer):
    """A tracer that records every module's internals (no leaf modules)."""

    def __init__(self, fx_stack_traces: bool = False):
        super().__init__()
        # fx's record_stack_traces symbolizes the whole Python stack (the source text of
        # every frame, ~60 deep inside a GPT) at every node: 40% of capturing a GPT-3.
        # partc reads only the user's frames (ir.user_source), so create_node formats those
        # alone, in the same traceback text. ``fx_stack_traces`` keeps fx's way (tests
        # compare the two).
        self.record_stack_traces = fx_stack_traces

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        if not self.record_stack_traces and not node.stack_trace:
            node.stack_trace = _user_stack_trace()
        return node

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return False

    def trace(self, root, concrete_args=None):
        # fx finds a parameter's name by scanning named_parameters() at every access,
        # quadratic in model size (2 s of a 96-layer GPT-3's 2.4 s); look names up instead.
        # The first name wins, as in fx: a tied weight keeps the name it was first given.
        self._name_of_tensor: dict[int, str] = {}
        if isinstance(root, nn.Module):
            tensors = list(root.named_parameters())
            if self.proxy_buffer_attributes:
                tensors += list(root.named_buffers())
            for name, tensor in tensors:
                self._name_of_tensor.setdefault(id(tensor), name)
        return super().trace(root, concrete_args)

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        proxied = isinstance(attr_val, nn.Parameter) or (self.proxy_buffer_attributes and isinstance(attr_val, torch.Tensor))
        name = self._name_of_tensor.get(id(attr_val)) if proxied else None
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]


@functools.lru_cache(maxsize=None)
def _is_library_file(path: str) -> bool:
    return is_library_file(path)


def _user_stack_trace() -> str:
    """The user's frames of the current stack from the outermost ``forward`` in, as
    ``traceback`` formats them (``File "f.py", line 3, in forward`` and the code line):
    what fx's filtered stack traces hold (nothing outside a forward, so placeholders get
    none), without symbolizing the frames it drops."""
    stack = []
    frame = sys._getframe(1)
    while frame is not None:
        stack.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    stack.reverse()
    first_forward = next((i for i, (_, _, name) in enumerate(stack) if name == "forward"), None)
    if first_forward is None:
        return ""
    return "\n".join(
        f'  File "{file}", line {line}, in {name}\n    {linecache.getline(file, line).strip()}'
        for file, line, name in stack[first_forward:]
        if not _is_library_file(file)
    )


@gc_paused()
def capture(model: nn.Module, example_inputs: Sequence[Any], *, frontend: str = "auto") -> fx.GraphModule:
    """Capture ``model`` called on ``example_inputs`` into an fx GraphModule.

    ``frontend``: "auto" (symbolic tracing, then torch.export), "fx" or "export".
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
            return _symbolic_trace(model, len(args))
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


def _symbolic_trace(model: nn.Module, num_args: int) -> fx.GraphModule:
    positional = _positional_parameters(model)
    # Arguments the caller leaves at their defaults (attention_mask=None) are traced as
    # those constants, so `if attention_mask is not None` takes the branch the user's call takes.
    defaults = {p.name: p.default for p in positional[num_args:]}
    graph = _TraceThroughModules().trace(model, concrete_args=defaults or None)
    for node in [n for n in graph.nodes if n.op == "placeholder"][num_args:]:
        for check in [u for u in node.users if u.target is fx._symbolic_trace._assert_is_none]:
            graph.erase_node(check)  # the constant is the user's own default
        if node.users:
            raise TypeError(f"forward() argument {node.target!r} is used although it was left at its default")
        graph.erase_node(node)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.meta[META_KEY] = GraphInfo(frontend="fx.symbolic_trace")
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
    gm.meta[META_KEY] = GraphInfo(frontend="torch.export", fallback_reason=fallback_reason, mutated_buffers=mutated)
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


@gc_paused()
def attach_loss(gm: fx.GraphModule, loss_fn: Callable[[Any, Any], Any]) -> fx.GraphModule:
    """Append ``loss_fn(output, targets)`` to the captured graph, with ``targets`` a new last input.

    ``loss_fn`` is traced on its own with ``torch.fx`` (loss functions are plain tensor code)
    and spliced after the model's output, so the loss is priced, planned and placed like any
    other operator, and the targets are an input that the pipeline routes to the stage that
    computes the loss. Parameter names are untouched (no wrapper module).

    A structured output (a dict, a tuple, HF's ``ModelOutput``) reaches ``loss_fn`` as that
    structure, with one placeholder per tensor, so ``outputs["logits"]`` and
    ``outputs.logits`` are resolved while tracing.
    """
    graph = gm.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    codegen = getattr(graph, "_codegen", None)
    restore = codegen.restore if isinstance(codegen, RestoreOutputType) else (lambda plain: plain)
    try:
        if not isinstance(output.args[0], fx.Node):
            model_outputs = pytree.tree_leaves(output.args[0])
            structure = pytree.tree_map(lambda _: fx.PH, output.args[0])
            loss_graph = fx.symbolic_trace(lambda output, targets: loss_fn(restore(output), targets), concrete_args={"output": structure}).graph
        else:
            model_outputs = [output.args[0]]
            loss_graph = fx.symbolic_trace(lambda output, targets: loss_fn(output, targets)).graph
    except Exception as e:  # noqa: BLE001
        raise TraceError(
            f"torch.fx could not trace loss_fn: {type(e).__name__}: {_first_line(e)}",
            ErrorContext(pass_name="capture", fix="write loss_fn(outputs, targets) as plain tensor code (F.cross_entropy, ...) without control flow on values"),
        ) from e
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_input):
        targets = graph.placeholder("targets")
    loss_inputs = iter([*model_outputs, targets])  # loss_graph's placeholders, in order
    env: dict[fx.Node, Any] = {}
    loss_value = None
    with graph.inserting_before(output):
        for node in loss_graph.nodes:
            if node.op == "placeholder":
                env[node] = next(loss_inputs)
            elif node.op == "output":
                # tracing on the output's structure flattens what loss_fn returns; process_outputs restores it
                loss_value = loss_graph.process_outputs(fx.node.map_arg(node.args[0], lambda n: env[n]))
            elif node.op == "get_attr":
                raise TraceError("loss_fn reads module state; partc takes a stateless loss_fn(outputs, targets)", ErrorContext(pass_name="capture"))
            else:
                env[node] = graph.node_copy(node, lambda n: env[n])
    output.args = (loss_value,)
    if isinstance(codegen, RestoreOutputType):
        graph.set_codegen(fx.graph.CodeGen())  # the graph returns the loss now
    gm.recompile()
    gm.meta[META_KEY] = replace(gm.meta[META_KEY], loss_in_graph=True)
    return gm
