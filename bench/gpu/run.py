"""The GPU benchmark: partc's chosen plan against hand-written torch layouts, on N GPUs.

    python bench/gpu/run.py --gpus 2 --out results/        # calibrate, measure, predict, report
    python bench/gpu/run.py --smoke                         # the same on CPU: gloo, 2 processes, tiny models

What one run does:

1. ``partc calibrate`` under torchrun on the N devices (matmul FLOP/s per dtype, memory
   bandwidth, link alpha-beta) writes ``OUT/cluster.json``; its measured bf16 matmul rate
   is the MFU ceiling, and partc plans on it (``--cluster`` skips this and uses a file or
   a preset).
2. For each model, one torchrun launch of ``worker.py`` trains every layout for a fixed
   number of steps (see worker.py for the timing and memory rules). A launch that dies
   (a layout out of memory on one rank while another waits) is started again with the
   layouts it had not reached; the one it died in is reported as crashed. A layout that
   cannot apply to the model (a pipeline with more stages than blocks, tensor parallelism
   that does not divide the heads) is recorded as skipped, with the reason, and not launched.
3. partc's cost model predicts each layout's step time and memory (``predict.py``, on
   the meta device, in parallel with the runs).
4. ``OUT/results.json`` holds everything; ``report.py`` prints the tables and draws the plot.

Precision: bf16 parameters, activations and gradients with torch's AdamW, loss in fp32
(layouts.py), the same for every layout. Model FLOPs per token: 6 x (parameters that
take part in matmuls: every nn.Linear weight, the tied LM head counted once, embedding
lookups not) + 12 x layers x sequence x d_model (attention scores and values, forward
and backward, counted over the full square as Megatron and PaLM count MFU).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import partc
from partc.models import config as model_config
from partc.models import training_case
from report import is_partc_run

# name -> (sequences per GPU, sequence length). gpt3-6.7b is the memory-bound model: at 16
# sequences of 2048 per GPU plain DDP (and FSDP2, and tp over 2) runs out of an H200's memory.
MODELS = {
    "gpt2-medium": (8, 1024),
    "gpt3-1.3b": (8, 2048),
    "gpt3-2.6b": (8, 2048),
    "llama-1b": (8, 2048),
    "gpt3-6.7b": (16, 2048),
}
MEMORY_BOUND = "gpt3-6.7b"
SMOKE_MODELS = {"gpt-tiny": (4, 32), "llama-tiny": (4, 32)}
PIPELINE_MICROBATCHES = (4, 8, 16)
ACCUMULATION_MICROBATCHES = (2, 4)


def layouts_for(world: int, batch: int, codegen: bool) -> list[str]:
    """The layouts one model runs: partc's pick first, then the hand-written ones."""
    names = ["partc"] + (["partc-tp"] if codegen else []) + ["ddp", "fsdp2", "tp"]
    names += [f"{dp}-acc{m}" for dp in ("ddp", "fsdp2") for m in ACCUMULATION_MICROBATCHES if (batch // world) % m == 0]
    names += [f"pp-m{m}" for m in PIPELINE_MICROBATCHES if batch % m == 0]
    if world >= 4:
        for tp in (2, 4, 8):
            for pp in (2, 4):
                if tp <= min(world, 8) and world % (tp * pp) == 0 and tp * pp < world * 2:
                    dp = world // (tp * pp)
                    names += [f"3d-tp{tp}-pp{pp}-m{m}" for m in PIPELINE_MICROBATCHES if (batch // dp) % m == 0]
    return names


def skip_reason(layout: str, name: str, world: int) -> str | None:
    """Why ``layout`` cannot apply to model ``name`` on ``world`` ranks, or None when it can.
    A pipeline needs a block per stage (the hand-written split gives each stage whole blocks),
    and tensor parallelism splits the attention heads (and Llama's key/value heads) evenly."""
    cfg = model_config(name)
    pipeline = re.fullmatch(r"pp-m\d+", layout)
    three_d = re.fullmatch(r"3d-tp(\d+)-pp(\d+)-m\d+", layout)
    tp = world if layout in ("tp", "partc-tp") else int(three_d.group(1)) if three_d else 1
    pp = world if pipeline else int(three_d.group(2)) if three_d else 1
    if pp > cfg.n_layer:
        return f"a pipeline of {pp} stages needs at least {pp} blocks; {name} has {cfg.n_layer}"
    heads = {"attention heads": cfg.n_head, "key/value heads": getattr(cfg, "n_kv_head", cfg.n_head)}
    for what, count in heads.items():
        if layout != "partc-tp" and count % tp:
            return f"tensor parallel over {tp} ranks splits the {what} evenly; {name} has {count}"
    return None


def model_flops_per_step(name: str, batch: int, seq: int) -> dict[str, Any]:
    """Model FLOPs of one training step (see the module docstring for what is counted)."""
    case = training_case(name, batch_size=1, seq_len=seq, device="meta")
    seen, matmul_params = set(), 0
    for module in case.model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            matmul_params += module.weight.numel()
    cfg = model_config(name)
    attention = 12 * cfg.n_layer * seq * cfg.d_model
    tokens = batch * seq
    return {
        "matmul_params": matmul_params,
        "params": sum(p.numel() for p in case.model.parameters()),
        "flops_per_token": 6 * matmul_params + attention,
        "flops_per_step": (6 * matmul_params + attention) * tokens,
        "tokens_per_step": tokens,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]


def calibrate(nproc: int, out: Path) -> Path:
    path = out / "cluster.json"
    command = _torchrun(nproc) + ["-m", "partc.calibrate", "--out", str(path)]
    print("[run] " + " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return path


def _launch(command: list[str], timeout: float) -> tuple[int, str, str]:
    """Run one torchrun launch: (exit code, stdout, stderr). On timeout the workers are
    stopped with torchrun, not left behind: a worker left running keeps its GPU memory, and
    the next launch would measure on a device that is not empty (seen on 8 x H200, where
    launches that hung on exit left ~24 GiB per GPU held into the next device call).
    torchrun starts each worker in its own session, so killing torchrun's group misses
    them: torchrun is asked to stop them (SIGTERM), then every one is killed."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return proc.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        workers = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)  # torchrun's agent terminates its workers
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        for pid in (proc.pid, *workers):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            stdout, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            stdout, stderr = "", "(the launch's output was lost: its pipes stayed open after the kill)"
    return -9, stdout or "", stderr or ""


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc; empty elsewhere)."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid:
                found.append(int(entry))
    return found


def run_model(name: str, batch: int, seq: int, layouts: list[str], args: argparse.Namespace, cluster: str, out: Path) -> dict[str, dict]:
    """Every layout of one model; relaunches after a crash with the layouts not yet reached."""
    jsonl = out / f"{name}.jsonl"
    jsonl.unlink(missing_ok=True)
    results: dict[str, dict] = {}
    remaining = list(layouts)
    while remaining:
        command = _torchrun(args.gpus) + [
            str(HERE / "worker.py"), "--model", name, "--batch", str(batch), "--seq", str(seq), "--layouts", json.dumps(remaining),
            "--cluster", cluster, "--out", str(jsonl), "--steps", str(args.steps), "--warmup", str(args.warmup), "--timeout", str(args.collective_timeout),
        ]
        print(f"[run] {name}: {' '.join(remaining)}", flush=True)
        returncode, stdout, stderr = _launch(command, args.launch_timeout)
        sys.stdout.write(stdout)
        started = None
        for line in jsonl.read_text().splitlines() if jsonl.exists() else []:
            record = json.loads(line)
            if record["event"] == "start":
                started = record["layout"]
            elif record["layout"] not in results:
                if record["layout"] not in layouts:
                    layouts.append(record["layout"])  # partc-fallback, queued by the worker
                results[record["layout"]] = record
                started = None if started == record["layout"] else started
        if returncode != 0:
            crashed = started or next((l for l in remaining if l not in results), None)
            tail = "\n".join(l for l in stderr.splitlines() if "Warning" not in l)[-3000:]
            where = f"in {crashed}" if crashed is not None else "after its last layout (every result was written)"
            print(f"[run] {name}: launch failed (exit {returncode}) {where}:\n{tail[-1500:]}", flush=True)
            if crashed is not None:
                results[crashed] = {"layout": crashed, "status": "crashed", "error": f"exit {returncode}", "traceback": tail}
        remaining = [l for l in layouts if l not in results]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="partc against hand-written torch layouts on N GPUs")
    parser.add_argument("--gpus", type=int, default=None, help="processes (GPUs); default: every visible GPU, 2 with --smoke")
    parser.add_argument("--out", default="bench-gpu-results", help="directory for cluster.json, results.json and the report")
    parser.add_argument("--models", default=None, help="comma-separated model names (default: the four benchmark models)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per layout (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--cluster", default=None, help="a cluster JSON or preset instead of calibrating")
    parser.add_argument("--layouts", default=None, help="comma-separated layout names to run (default: all that apply)")
    parser.add_argument("--no-codegen", action="store_true", help="skip partc-tp (the codegen-overhead comparison)")
    parser.add_argument("--launch-timeout", type=float, default=900, help="seconds one model's launch may take")
    parser.add_argument("--collective-timeout", type=float, default=240, help="seconds a collective may wait (a rank that died)")
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny models, 1 warm-up and 2 timed steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.gpus = args.gpus or 2
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        args.cluster = args.cluster or f"cpu:1x{args.gpus}"
    args.gpus = args.gpus or torch.cuda.device_count()
    if args.gpus < 1:
        parser.error("no GPUs visible: pass --gpus N, or --smoke for CPU")
    catalogue = SMOKE_MODELS if args.smoke else MODELS
    names = args.models.split(",") if args.models else list(catalogue)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    cluster_spec = args.cluster or str(calibrate(args.gpus, out))
    cluster = partc.Cluster.parse(cluster_spec)
    device = cluster.nodes[0].device
    ceiling = device.flops("bfloat16")
    summary: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable), "bench/gpu/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "gpus": args.gpus,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "CPU",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cluster": cluster.to_dict(),
        "cluster_source": "calibrated in this run" if args.cluster is None else args.cluster,
        "ceiling_flops": ceiling,
        "steps": args.steps,
        "warmup": args.warmup,
        "memory_bound_model": MEMORY_BOUND if MEMORY_BOUND in names else None,
        "models": {},
    }
    from predict import predict

    with concurrent.futures.ProcessPoolExecutor(max_workers=4) as pool:
        pending = {}
        for name in names:
            per_gpu, seq = catalogue[name]
            batch = per_gpu * args.gpus
            layouts = layouts_for(args.gpus, batch, codegen=not args.no_codegen)
            if args.layouts:  # in the order asked; partc-zero<K> only when asked for
                layouts = [l for l in args.layouts.split(",") if l in layouts or re.fullmatch(r"partc-zero\d", l)]
            skipped = {l: {"layout": l, "status": "skipped", "error": reason} for l in layouts if (reason := skip_reason(l, name, args.gpus))}
            layouts = [l for l in layouts if l not in skipped]
            for layout in layouts:
                if not is_partc_run(layout):
                    pending[(name, layout)] = pool.submit(predict, name, batch, seq, cluster, layout)
            results = run_model(name, batch, seq, layouts, args, cluster_spec, out) if layouts else {}
            summary["models"][name] = {"batch": batch, "seq": seq, **model_flops_per_step(name, batch, seq), "layouts": {**results, **skipped}}
            # the measurements so far, in case the predictions or a later model do not finish in time
            (out / "results.json").write_text(json.dumps(summary, indent=1))
        for (name, layout), future in pending.items():
            result = summary["models"][name]["layouts"].get(layout)
            if result is not None:
                result["prediction"] = future.result()
    for entry in summary["models"].values():
        for partc_layout, partc_result in entry["layouts"].items():
            if not (is_partc_run(partc_layout) and partc_result.get("status") == "ok"):
                continue
            d = partc_result["detail"]
            partc_result["prediction"] = {"step_time": d["predicted_step_time"], "memory": d["predicted_memory"], "note": "the plan partc ran"}
    summary["wall_seconds"] = time.time() - started
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    from report import render

    print(render(summary, out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
