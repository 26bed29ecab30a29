"""Estimate pass: predicted time and memory of a data-parallel plan, layer by layer.

Reads the annotated graph and prices it on a cluster with the analytic cost model. Each
of ``dp`` replicas runs the whole model on ``batch / dp`` samples, so a node's FLOPs and
bytes scale by ``1 / dp`` (the graph was traced at the global batch). Per node::

    forward  = roofline(fwd_flops / dp, bytes_moved / dp)
    backward = roofline(bwd_flops / dp, 2 * bytes_moved / dp)   (0 if nothing needs grads)

at the matmul rate x :func:`kernel_efficiency` (fused attention and matmuls with a
dimension that is not a multiple of 16 bytes run below a large aligned matmul) and never
below the device's kernel overhead (:meth:`~partc.cost_model.CostModel.compute_time`).

Gradients are all-reduced over the replicas by DDP in buckets during backward; only the
part that outlasts backward is exposed, and the last bucket is always exposed::

    exposed = max(all_reduce(grad_bytes) - backward, all_reduce(min(bucket, grad_bytes)))

The optimizer step is memory-bound: torch's foreach AdamW makes 20 element accesses per
parameter (:func:`~partc.cost_model.optimizer_step_bytes`).

Memory per device = parameters + gradients + optimizer state (:func:`training_memory`)
+ the activations one replica keeps for backward + the largest single output
(a transient workspace, typically the logits).

The devices of the slowest kind set the pace: with mixed GPU kinds, every replica waits
for the slowest one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
from partc.passes.ir import NodeInfo, OpKind, graph_info, node_info

from partc.cluster import DeviceSpec
from partc.cost_model import (
    CostModel,
    MemoryBreakdown,
    optimizer_step_bytes,
    training_memory,
)
from partc.errors import ErrorContext, InfeasiblePlanError

DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP's default bucket_cap_mb


@dataclass(frozen=True)
class LayerEstimate:
    """Predicted cost of one layer on one device."""

    index: int
    name: str
    signature: str
    fwd_flops: float  # per device (already divided among replicas)
    forward_time: float  # seconds
    backward_time: float  # seconds
    param_numel: int
    param_bytes: int
    activation_bytes: float  # kept for backward, per device
    memory: float  # bytes this layer adds to a device: weights, grads, optimizer state, activations


@dataclass(frozen=True)
class Estimate:
    """Predicted step of a whole plan."""

    layers: tuple[LayerEstimate, ...]
    compute_time: float  # forward + backward, seconds
    gradient_sync_time: float  # total all-reduce time of the gradients
    exposed_sync_time: float  # the part not hidden behind backward
    optimizer_time: float
    step_time: float
    memory: MemoryBreakdown  # peak bytes per device
    compute_dtype: str


def estimate_data_parallel(
    gm: fx.GraphModule,
    cost_model: CostModel,
    *,
    dp: int,
    compute_dtype: torch.dtype | None = None,
    optimizer: str = "adamw",
    training: bool = True,
) -> Estimate:
    """Predict the step of ``dp`` data-parallel replicas of the annotated ``gm``."""
    cluster = cost_model.cluster
    batch = batch_size(gm)
    if batch % dp:
        raise InfeasiblePlanError(
            f"the global batch of {batch} does not split over {dp} data-parallel replicas",
            ErrorContext(pass_name="estimate", fix=f"use a global batch that is a multiple of {dp}"),
        )
    device = cluster.slowest_device(range(dp))
    info_of = {n.name: node_info(n) for n in gm.graph.nodes}
    nodes = list(info_of.values())
    mixed = compute_dtype is not None
    weight_dtype = _parameter_dtype(nodes)
    param_dtype = compute_dtype or weight_dtype
    param_numel = sum(i.param_numel for i in nodes)
    buffer_bytes = max(sum(i.param_bytes for i in nodes) - param_numel * weight_dtype.itemsize, 0)
    per_param = training_memory(1, param_dtype, 0.0, optimizer=optimizer, mixed_precision=mixed, training=training)

    # A node's time depends only on what roofline_time reads (its operator, outputs and
    # FLOPs, via kernel_efficiency and its dtype) and the work priced: the nodes of repeated
    # layers are priced once, the sums below still run over every node in order.
    node_times: dict[tuple, float] = {}

    def node_time(info: NodeInfo, flops: float, bytes_moved: float) -> float:
        key = (info.op, info.outputs, info.fwd_flops, flops, bytes_moved)
        seconds = node_times.get(key)
        if seconds is None:
            seconds = node_times[key] = roofline_time(cost_model, info, flops / dp, bytes_moved / dp, compute_dtype, device)
        return seconds

    layers = []
    for layer in graph_info(gm).layers:
        members = [info_of[name] for name in layer.nodes]
        forward = sum(node_time(i, i.fwd_flops, i.bytes_moved) for i in members)
        backward = sum(node_time(i, i.bwd_flops, 2 * i.bytes_moved) for i in members if i.bwd_flops) if training else 0.0
        activations = layer.activation_bytes / dp if training else 0.0
        layer_buffers = max(layer.param_bytes - layer.param_numel * weight_dtype.itemsize, 0)
        layers.append(
            LayerEstimate(
                index=layer.index,
                name=layer.name,
                signature=layer.signature,
                fwd_flops=layer.fwd_flops / dp,
                forward_time=forward,
                backward_time=backward,
                param_numel=layer.param_numel,
                param_bytes=layer.param_bytes,
                activation_bytes=activations,
                memory=layer.param_numel * per_param.total + layer_buffers + activations,
            )
        )
    forward_total = sum(l.forward_time for l in layers)
    backward_total = sum(l.backward_time for l in layers)

    ranks = list(range(dp))
    grad_bytes = param_numel * param_dtype.itemsize if training else 0
    sync = cost_model.all_reduce(grad_bytes, ranks)
    last_bucket = cost_model.all_reduce(min(DDP_BUCKET_BYTES, grad_bytes), ranks)
    exposed = max(CostModel.exposed(sync, backward_total), last_bucket) if grad_bytes else 0.0
    optimizer_time = param_numel * optimizer_step_bytes(optimizer, param_dtype, mixed) / device.memory_bandwidth if training else 0.0

    largest_output = max((s.nbytes for i in nodes if i.op not in (OpKind.PARAMETER, OpKind.INPUT) for s in i.outputs), default=0)
    memory = training_memory(
        param_numel,
        param_dtype,
        sum(l.activation_bytes for l in layers),
        optimizer=optimizer,
        mixed_precision=mixed,
        training=training,
        transient_bytes=largest_output / dp,
    )
    memory = memory + MemoryBreakdown(parameters=buffer_bytes, gradients=0, optimizer_state=0, activations=0)
    compute = forward_total + backward_total
    return Estimate(
        layers=tuple(layers),
        compute_time=compute,
        gradient_sync_time=sync,
        exposed_sync_time=exposed,
        optimizer_time=optimizer_time,
        step_time=compute + exposed + optimizer_time,
        memory=memory,
        compute_dtype=str(param_dtype).removeprefix("torch."),
    )


def roofline_time(cost_model: CostModel, info: NodeInfo, flops: float, bytes_moved: float, compute_dtype: torch.dtype | None, device) -> float:
    """One node's kernel time on ``device``; floating-point work runs in ``compute_dtype``
    when mixed precision is on, everything else in the node's own dtype."""
    if flops == 0 and bytes_moved == 0:
        return 0.0
    floating = info.dtype is not None and info.dtype.is_floating_point
    dtype = compute_dtype if (compute_dtype is not None and floating) else (info.dtype or torch.float32)
    return cost_model.compute_time(flops, bytes_moved, dtype, device, kernel_efficiency(info, device, dtype))


# Tensor cores read operands in 16-byte pieces: a matmul whose leading dimensions are not
# multiples of 16 bytes cannot use the fast kernels (cuBLAS falls back to older, unaligned ones).
MATMUL_ALIGNMENT_BYTES = 16


def kernel_efficiency(info: NodeInfo, device: DeviceSpec, dtype: torch.dtype) -> float:
    """The node's FLOP rate as a fraction of a large aligned matmul's, from the device's
    calibration: fused attention at its head dimension (the nearest one measured), a
    matmul with a dimension that is not a multiple of 16 bytes (a 50257-token vocabulary)
    at the misaligned rate, everything else 1."""
    if not info.outputs or not info.outputs[0].shape:
        return 1.0
    if info.op == OpKind.ATTENTION and device.attention_efficiency:
        head_dim = info.outputs[0].shape[-1]
        nearest = min(device.attention_efficiency, key=lambda d: (abs(math.log2(int(d) / max(head_dim, 1))), int(d)))
        return device.attention_efficiency[nearest]
    if info.op in (OpKind.LINEAR, OpKind.MATMUL) and info.fwd_flops:
        out = info.outputs[0]
        inner = info.fwd_flops // (2 * out.numel)  # K: linear and matmul FLOPs are 2·out·K (+ out for a bias)
        aligned = max(1, MATMUL_ALIGNMENT_BYTES // dtype.itemsize)
        if out.shape[-1] % aligned or inner % aligned:
            return device.misaligned_matmul_efficiency
    return 1.0


def batch_size(gm: fx.GraphModule) -> int:
    """The global batch: the leading dimension of the first input."""
    specs = graph_info(gm).input_specs
    if not specs or not specs[0].shape:
        raise InfeasiblePlanError(
            "cannot find a batch dimension: the first input is not a tensor with a leading batch dimension",
            ErrorContext(pass_name="estimate", fix="pass the batch as the first of example_inputs"),
        )
    return specs[0].shape[0]


def _parameter_dtype(nodes: list[NodeInfo]) -> torch.dtype:
    """The dtype of the trainable parameters (the most common by size)."""
    by_dtype: dict[torch.dtype, int] = {}
    for i in nodes:
        if i.op == OpKind.PARAMETER and i.param_numel:
            by_dtype[i.dtype] = by_dtype.get(i.dtype, 0) + i.param_numel
    return max(by_dtype, key=by_dtype.get) if by_dtype else torch.float32
