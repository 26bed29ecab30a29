"""The ``partc`` command.

    partc plan                                   plan the built-in GPT-2 (124M) on 8 H100s
    partc plan llama-7b --cluster h100:2x8       a built-in model on a preset cluster
    partc plan mypkg.models:make --cluster cluster.json --json plan.json --dot graph.dot
    partc plan gpt2 --cluster h100x2 --mesh pp=2 --report plan.html
    partc plan gpt2 --cache ~/.cache/partc       reuse a stored plan (the search is skipped)
    partc graph gpt-tiny                         print the annotated graph
    partc models                                 list the built-in models
    torchrun --nproc-per-node 8 -m partc.calibrate --out cluster.json   (or: partc calibrate)

A user model is named ``MODULE:FACTORY``; the factory takes no arguments and returns
``(model, example_inputs)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from partc.errors import PartcError

DEFAULT_MODEL = "gpt2"
DEFAULT_CLUSTER = "h100x8"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["calibrate"]:
        from partc import calibrate

        return calibrate.main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except PartcError as e:
        print(f"partc: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `partc graph | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="partc", description="Automatic hybrid parallelism for PyTorch models.")
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="plan a model on a cluster and print the plan")
    _add_model_arguments(plan)
    plan.add_argument("--cluster", default=DEFAULT_CLUSTER, help="preset (h100, h100x8, h200:2x8, a100, cpu) or a JSON file from `partc calibrate` (default: %(default)s)")
    plan.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="matmul dtype; bf16/fp16 keep fp32 master weights (default: %(default)s)")
    plan.add_argument("--memory-limit-gib", type=float, help="bytes per device the plan must fit in (default: the device memory)")
    plan.add_argument("--mesh", metavar="DIM=N", help='pin the parallelism, e.g. "pp=2", "tp=4" or "dp=8" (default: data parallel)')
    plan.add_argument("--json", metavar="PATH", help="write the plan as JSON")
    plan.add_argument("--cache", metavar="DIR", help="reuse plans stored in DIR (keyed by model, inputs, cluster, options, versions); a hit skips the search")
    plan.add_argument("--report", metavar="PATH", help="write a self-contained HTML report of the plan")
    plan.add_argument("--source", metavar="DIR", help="write the code each rank runs to DIR/rank_N.py (one file per distinct rank)")
    plan.add_argument("--dot", metavar="PATH", help="write the annotated graph as Graphviz DOT")
    plan.add_argument("--expand", action="store_true", help="list every layer instead of folding identical blocks")
    plan.set_defaults(run=_run_plan)

    graph = commands.add_parser("graph", help="print the annotated operator graph of a model")
    _add_model_arguments(graph)
    graph.set_defaults(run=_run_graph)

    models = commands.add_parser("models", help="list the built-in models")
    models.set_defaults(run=_run_models)
    commands.add_parser("calibrate", help="measure this machine under torchrun and write a cluster JSON (see partc calibrate --help)")
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="a built-in model (see `partc models`) or MODULE:FACTORY (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="global batch size for built-in models (default: %(default)s)")
    parser.add_argument("--seq", type=int, help="sequence length for built-in models (default: the model's maximum)")
    parser.add_argument("--frontend", default="auto", choices=["auto", "fx", "export"], help="capture frontend (default: %(default)s)")


def _load_model(args: argparse.Namespace):
    if ":" not in args.model:
        from partc import models

        # Planning reads shapes only: build on the meta device, no weights allocated.
        return models.build(args.model, batch_size=args.batch, seq_len=args.seq, device="meta")
    module_name, _, factory_name = args.model.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PartcError(f"cannot import {module_name!r} for model {args.model!r}: {e}") from e
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise PartcError(f"{module_name} has no callable {factory_name!r}; MODULE:FACTORY must name a function returning (model, example_inputs)")
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise PartcError(f"{args.model} returned {type(result).__name__}; the factory must return (model, example_inputs)")
    return result


def parse_mesh(text: str) -> dict[str, int]:
    """``"pp=2,dp=2,tp=2"`` -> ``{"pp": 2, "dp": 2, "tp": 2}``."""
    mesh = {}
    for part in text.split(","):
        name, _, degree = part.partition("=")
        if not degree.strip().isdigit():
            raise PartcError(f"cannot read mesh {text!r}; write DIM=N[,DIM=N], e.g. pp=2 or tp=4")
        mesh[name.strip()] = int(degree)
    return mesh


def _progress(line: str) -> None:
    print(f"  [partc] {line}", file=sys.stderr, flush=True)


def _run_plan(args: argparse.Namespace) -> int:
    import partc

    cluster = partc.Cluster.parse(args.cluster)
    model, inputs = _load_model(args)
    limit = args.memory_limit_gib * 2**30 if args.memory_limit_gib else None
    mixed = None if args.dtype == "fp32" else args.dtype
    mesh = parse_mesh(args.mesh) if args.mesh else None
    result = partc.plan(model, cluster, inputs, mesh=mesh, mixed_precision=mixed, memory_limit=limit, frontend=args.frontend, cache=args.cache, progress=_progress)
    print(result.summary(expand=args.expand))
    if args.json:
        result.to_json(args.json)
        print(f"plan written to {args.json}")
    if args.source:
        _write_sources(result, args.source)
    if args.report:
        from partc.report import write_report

        write_report(result, args.report)
        print(f"report written to {args.report}")
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(result.to_dot())
        print(f"annotated graph written to {args.dot} (render: dot -Tsvg {args.dot} -o graph.svg)")
    return 0


def _write_sources(plan, folder: str) -> None:
    """One file per rank whose code differs: tensor-parallel ranks hold different slices,
    pipeline ranks different stages; data-parallel ranks all run rank 0's code."""
    import os

    os.makedirs(folder, exist_ok=True)
    distinct = plan.mesh["tp"] if plan.mesh["tp"] > 1 else plan.mesh["pp"]
    for rank in range(distinct):
        with open(os.path.join(folder, f"rank_{rank}.py"), "w") as f:
            f.write(plan.source(rank))
    print(f"code of {distinct} rank(s) written to {folder}/")


def _run_graph(args: argparse.Namespace) -> int:
    from partc.passes.annotate import annotate
    from partc.passes.capture import capture
    from partc.passes.ir import graph_info, node_info
    from partc.passes.propagate import propagate

    model, inputs = _load_model(args)
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    gm = annotate(propagate(capture(model, inputs, frontend=args.frontend), inputs))
    info = graph_info(gm)
    print(f"# {type(model).__name__}: {len(gm.graph.nodes)} nodes in {len(info.layers)} layers, captured with {info.frontend}")
    layers = info.layers
    current = None
    for node in gm.graph.nodes:
        meta = node_info(node)
        if meta.layer != current:
            current = meta.layer
            print(f"\n## layer {current}: {layers[current].name}  (signature {layers[current].signature})")
        shapes = " ".join(str(s) for s in meta.outputs) or "-"
        flops = f"{meta.fwd_flops / 1e6:,.2f} MFLOP" if meta.fwd_flops else ""
        source = f"  # {meta.source}" if meta.source else ""
        print(f"  {node.name:<28} {meta.op.value:<11} {meta.name:<28} {shapes:<34} {flops:>16}  [{meta.module or '<root>'}]{source}")
    return 0


def _run_models(args: argparse.Namespace) -> int:
    from partc import models

    for name, description in models.MODELS.items():
        print(f"{name:<14} {description}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
