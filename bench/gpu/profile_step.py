"""Where one training step's GPU time goes: the kernels of one model on one GPU, by kind.

    CUDA_VISIBLE_DEVICES=0 python bench/gpu/profile_step.py gpt2-medium:8:1024 llama-1b:8:2048 --out prof.json

For each ``model:batch:seq`` it builds the model as the benchmark does (bf16, the same
AdamW, the loss in fp32 from bf16 logits; layouts.py), runs 2 warm-up steps, times 3
steps (median, synchronised) and profiles one more with ``torch.profiler``. It writes:

* ``step_time``: the median wall time of a step (forward, loss, backward, AdamW);
* ``kernel_time``: the sum of the profiled step's GPU kernel durations by kind (matmul,
  attention, optimizer, normalisation and reductions, the loss, other elementwise), and
  ``idle``: the profiled step's wall time less its kernel time (the GPU waiting on the
  CPU, when the kernels are shorter than their dispatch);
* ``kernels``: the profiled step's number of kernels;
* ``ops``: the 40 aten operators with the most GPU time, with their input shapes.

This is the data behind the cost model's terms (docs/benchmarks.md, "Why the predictions
were too fast"); it trains nothing in parallel and is not part of ``run.py``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layouts import language_model_loss, make_optimizer

from partc.models import training_case

# Kernel kinds by name, first match wins.
KINDS = (
    ("attention", r"flash|fmha|attention|sdpa|cudnn"),
    ("optimizer", r"multi_tensor|foreach"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|sm90|sm80_"),
    ("loss", r"log_softmax|nll_loss|cross_entropy|softmax_backward"),
    ("norm_reduce", r"layer_norm|rms|reduce|norm|welford"),
    ("elementwise", r"elementwise|vectorized|unrolled|copy|fill|index|cat|gather|scatter"),
)


def kind_of(kernel: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, kernel, re.IGNORECASE):
            return kind
    return "other"


def one_model(name: str, batch: int, seq: int, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    case = training_case(name, batch_size=batch, seq_len=seq, device=device)
    model = case.model.to(torch.bfloat16)
    optimizer = make_optimizer(model.parameters())

    def step() -> None:
        loss = language_model_loss(model(*case.inputs), case.targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        profiled = time.perf_counter() - t0
    by_kind: dict[str, float] = {}
    count = 0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            seconds = (event.time_range.end - event.time_range.start) / 1e6
            by_kind[kind_of(event.name)] = by_kind.get(kind_of(event.name), 0.0) + seconds
            count += 1
    ops = []
    for row in prof.key_averages(group_by_input_shape=True):
        gpu = getattr(row, "self_device_time_total", None)
        gpu = gpu if gpu is not None else getattr(row, "self_cuda_time_total", 0)
        if gpu:
            ops.append({"op": row.key, "shapes": str(row.input_shapes)[:200], "count": row.count, "gpu_s": gpu / 1e6})
    ops.sort(key=lambda o: -o["gpu_s"])
    kernel_total = sum(by_kind.values())
    result = {
        "model": name, "batch": batch, "seq": seq, "step_time": statistics.median(times), "step_times": times,
        "profiled_step_time": profiled, "kernel_time": by_kind, "kernel_total": kernel_total,
        "idle": profiled - kernel_total, "kernels": count, "ops": ops[:40],
        "peak_memory": torch.cuda.max_memory_allocated() if cuda else None,
    }
    return result


def pointwise_bandwidth() -> float:
    """Bytes/s of a bf16 add of 64 MiB tensors (two reads, one write)."""
    numel = 32 * 2**20
    a, b, c = (torch.randn(numel, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for _ in range(3):
        torch.add(a, b, out=c)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(10):
        start.record()
        for _ in range(20):
            torch.add(a, b, out=c)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / 20)
    return 3 * numel * 2 / statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model:batch:seq")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    results = {
        "device": torch.cuda.get_device_name(0) if cuda else "CPU", "torch": torch.__version__,
        "pointwise_bandwidth": pointwise_bandwidth() if cuda else None, "models": [],
    }
    for spec in args.models:
        name, batch, seq = spec.split(":")
        try:
            results["models"].append(one_model(name, int(batch), int(seq), device))
        except torch.cuda.OutOfMemoryError as e:
            results["models"].append({"model": name, "error": str(e).splitlines()[0]})
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - one model's failure must not lose the others' data
            results["models"].append({"model": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
        if cuda:  # the model and its optimizer went with one_model's frame
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(json.dumps({k: v for k, v in results["models"][-1].items() if k != "ops"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
