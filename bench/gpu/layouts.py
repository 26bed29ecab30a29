"""The hand-written torch layouts partc is measured against, each built from scratch.

Every builder takes a :class:`Setup` (the model to build, the global batch, this rank's
device) and returns a :class:`Trainer` whose ``step()`` runs one full training step:
forward, loss, backward and the AdamW update. They are written the way a user of plain
torch would write them, with torch's own parallel APIs:

* :func:`ddp` - ``DistributedDataParallel``, each rank on its slice of the batch;
* :func:`fsdp2` - ``fully_shard`` on every transformer block and on the root (ZeRO-3);
* both with gradient accumulation over M microbatches of the rank's slice (``ddp-acc<M>``,
  ``fsdp2-acc<M>``): gradients are synchronised once, after the last microbatch
  (``no_sync`` / ``set_requires_gradient_sync``), the loss of each scaled by 1/M;
* :func:`tensor_parallel` - ``parallelize_module`` with the Megatron plan: column-parallel
  q/k/v and MLP-in, row-parallel attention-out and MLP-out, a vocabulary-parallel
  embedding and LM head, and the loss under ``loss_parallel`` (no gathered logits);
* :func:`pipeline` - ``torch.distributed.pipelining`` with a manual even split of the
  blocks (the first stage also holds the embeddings, the last the final norm and the
  head) and the 1F1B schedule; a tied embedding/head weight has its gradient summed
  between the two stages that hold it, as Megatron does;
* :func:`megatron_3d` - tensor parallel inside the node, pipeline across, data parallel
  (FSDP2 over the "dp" dimension, as torchtitan composes them) on what is left.

Precision (the same for every layout, partc's included): parameters, activations and
gradients in bf16, ``torch.optim.AdamW`` (which keeps its moments in the parameters'
dtype), the loss in fp32 from bf16 logits (:func:`language_model_loss`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from partc.models import GPT, Llama, TrainingCase

LEARNING_RATE = 1e-4


def language_model_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy in fp32 over bf16 logits: the loss of every layout.
    (A plain function of tensors, so partc can trace it into the graph.)"""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


@dataclass
class Setup:
    """What every layout builder needs."""

    build: Callable[[], TrainingCase]  # the model (bf16, on this rank's device) and the global batch, same on every rank
    device: torch.device
    rank: int
    world: int
    batch_size: int  # the global batch, in sequences


@dataclass
class Trainer:
    """One layout, ready to train: ``step()`` runs forward, backward and the optimizer."""

    step: Callable[[], None]
    detail: dict[str, Any] = field(default_factory=dict)  # what was run (microbatches, groups, ...)
    keep: list[Any] = field(default_factory=list)  # objects that must live as long as the trainer


def make_optimizer(parameters) -> torch.optim.Optimizer:
    """The optimizer of every layout, partc's included: AdamW with torch's default (foreach)
    implementation. DTensor parameters (tensor parallel) and plain ones (the norms a
    Megatron plan leaves replicated) go in separate groups: a foreach kernel cannot mix
    them, and torch runs one per group."""
    parameters = list(parameters)
    sharded = [p for p in parameters if _is_dtensor(p)]
    plain = [p for p in parameters if not _is_dtensor(p)]
    groups = [{"params": group} for group in (sharded, plain) if group]
    return torch.optim.AdamW(groups, lr=LEARNING_RATE)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" or hasattr(tensor, "device_mesh")


def training_step(optimizer: torch.optim.Optimizer, forward_backward: Callable[[], None]) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward_backward()
        optimizer.step()

    return step


def _local_batch(case: TrainingCase, parts: int, index: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    (tokens,) = case.inputs
    return tokens.chunk(parts)[index].to(device), case.targets.chunk(parts)[index].to(device)


# -- model families: where the blocks are, how a stage runs, the Megatron plan -----------
class _Family:
    """What the layouts need to know about one model family (GPT or Llama)."""

    blocks_attr: str

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return getattr(model, self.blocks_attr)

    def embed(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_block(self, model: nn.Module, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, model: nn.Module, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embedding_names(self) -> tuple[str, ...]:
        """Submodules only the first stage needs."""
        raise NotImplementedError

    def head_names(self) -> tuple[str, ...]:
        """Submodules only the last stage needs."""
        raise NotImplementedError

    def tied(self, model: nn.Module) -> bool:
        return bool(model.config.tie_weights)

    def megatron_plan(self, tp_mesh) -> dict[str, Any]:
        raise NotImplementedError

    def shard_heads(self, model: nn.Module, tp: int) -> None:
        """Each tensor-parallel rank computes ``1/tp`` of the heads: fix the counts the views read."""
        raise NotImplementedError


class _GPTFamily(_Family):
    blocks_attr = "blocks"

    def embed(self, model, tokens):
        pos = torch.arange(tokens.size(1), device=tokens.device)
        return model.drop(model.wte(tokens) + model.wpe(pos))

    def run_block(self, model, block, h):
        return block(h)

    def head(self, model, h):
        return model.lm_head(model.ln_f(h))

    def embedding_names(self):
        return ("wte", "wpe", "drop")

    def head_names(self):
        return ("ln_f", "lm_head")

    def megatron_plan(self, tp_mesh):
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        return {
            "wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "blocks.*.attn.qkv": ColwiseParallel(),
            "blocks.*.attn.proj": RowwiseParallel(),
            "blocks.*.mlp.fc": ColwiseParallel(),
            "blocks.*.mlp.proj": RowwiseParallel(),
            "lm_head": ColwiseParallel(output_layouts=Shard(-1)),
        }

    def shard_heads(self, model, tp):
        for block in model.blocks:
            attn = block.attn
            # The fused qkv weight is [q; k; v]: interleave it so that rank r's contiguous
            # column shard holds rank r's heads of q, k and v (what chunk(3) then splits).
            with torch.no_grad():
                w = attn.qkv.weight
                d = w.shape[1]
                w.copy_(w.view(3, tp, -1, d).transpose(0, 1).reshape(-1, d))
                if attn.qkv.bias is not None:
                    b = attn.qkv.bias
                    b.copy_(b.view(3, tp, -1).transpose(0, 1).reshape(-1))
            attn.n_head //= tp


class _LlamaFamily(_Family):
    blocks_attr = "layers"

    def embed(self, model, tokens):
        return model.tok_embeddings(tokens)

    def run_block(self, model, block, h):
        T = h.size(1)
        return block(h, model.rope_cos.narrow(0, 0, T), model.rope_sin.narrow(0, 0, T))

    def head(self, model, h):
        return model.output(model.norm(h))

    def embedding_names(self):
        return ("tok_embeddings",)

    def head_names(self):
        return ("norm", "output")

    def megatron_plan(self, tp_mesh):
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        return {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "layers.*.attention.wq": ColwiseParallel(),
            "layers.*.attention.wk": ColwiseParallel(),
            "layers.*.attention.wv": ColwiseParallel(),
            "layers.*.attention.wo": RowwiseParallel(),
            "layers.*.feed_forward.w1": ColwiseParallel(),
            "layers.*.feed_forward.w3": ColwiseParallel(),
            "layers.*.feed_forward.w2": RowwiseParallel(),
            "output": ColwiseParallel(output_layouts=Shard(-1)),
        }

    def shard_heads(self, model, tp):
        for layer in model.layers:
            layer.attention.n_head //= tp
            layer.attention.n_kv_head //= tp


def family(model: nn.Module) -> _Family:
    if isinstance(model, GPT):
        return _GPTFamily()
    if isinstance(model, Llama):
        return _LlamaFamily()
    raise TypeError(f"the hand-written layouts know GPT and Llama, not {type(model).__name__}")


def _embedding_weight(model: nn.Module) -> nn.Parameter:
    return model.wte.weight if isinstance(model, GPT) else model.tok_embeddings.weight


def _head(model: nn.Module) -> nn.Linear:
    return model.lm_head if isinstance(model, GPT) else model.output


# -- data parallel --------------------------------------------------------------------
def _accumulating(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, microbatches: int, no_sync: Callable[[bool], Any]) -> Callable[[], None]:
    """Forward and backward over ``microbatches`` equal slices of the rank's batch, each
    loss scaled by 1/M (the mean over the rank's batch, as one pass would take it);
    ``no_sync(True)`` holds the gradient collectives back until the last slice."""
    if tokens.shape[0] % microbatches:
        raise ValueError(f"{microbatches} microbatches do not divide this rank's {tokens.shape[0]} sequences")
    slices = list(zip(tokens.chunk(microbatches), targets.chunk(microbatches)))

    def forward_backward():
        for i, (x, y) in enumerate(slices):
            no_sync(i < len(slices) - 1)
            (language_model_loss(model(x), y) / microbatches).backward()

    return forward_backward


def ddp(setup: Setup, microbatches: int = 1) -> Trainer:
    """DDP; with ``microbatches`` > 1, gradient accumulation under ``no_sync`` (the
    all-reduce runs once, in the last microbatch's backward)."""
    import contextlib

    from torch.nn.parallel import DistributedDataParallel

    case = setup.build()
    tokens, targets = _local_batch(case, setup.world, setup.rank, setup.device)
    model = DistributedDataParallel(case.model, device_ids=[setup.device.index] if setup.device.type == "cuda" else None)
    optimizer = make_optimizer(model.parameters())
    held = contextlib.ExitStack()

    def no_sync(hold: bool) -> None:
        held.close()
        if hold:
            held.enter_context(model.no_sync())

    forward_backward = _accumulating(model, tokens, targets, microbatches, no_sync)
    return Trainer(training_step(optimizer, forward_backward), {"per_rank_batch": tokens.shape[0], "microbatches": microbatches}, [model, optimizer])


def fully_shard_function() -> Callable:
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def fsdp2(setup: Setup, microbatches: int = 1) -> Trainer:
    """FSDP2 on every block and the root; with ``microbatches`` > 1, gradient accumulation
    with the reduce-scatter held back until the last microbatch."""
    fully_shard = fully_shard_function()
    case = setup.build()
    tokens, targets = _local_batch(case, setup.world, setup.rank, setup.device)
    model = case.model
    for block in family(model).blocks(model):
        fully_shard(block)
    fully_shard(model)
    optimizer = make_optimizer(model.parameters())

    def no_sync(hold: bool) -> None:
        model.set_requires_gradient_sync(not hold)

    forward_backward = _accumulating(model, tokens, targets, microbatches, no_sync)
    detail = {"per_rank_batch": tokens.shape[0], "units": "every block + root", "microbatches": microbatches}
    return Trainer(training_step(optimizer, forward_backward), detail, [model, optimizer])


# -- tensor parallel ------------------------------------------------------------------
def apply_megatron_tp(model: nn.Module, tp_mesh) -> None:
    """``parallelize_module`` with the Megatron plan; a tied embedding/head weight stays tied
    (both are sharded over the vocabulary, the same placement)."""
    from torch.distributed.tensor.parallel import parallelize_module

    fam = family(model)
    tp = tp_mesh.size()
    fam.shard_heads(model, tp)
    plan = fam.megatron_plan(tp_mesh)
    present = {name for name, _ in model.named_modules()}
    plan = {k: v for k, v in plan.items() if "*" in k or k in present}
    tied = fam.tied(model) and getattr(model, fam.embedding_names()[0], None) is not None and getattr(model, fam.head_names()[-1], None) is not None
    parallelize_module(model, tp_mesh, plan)
    if tied:
        _head(model).weight = _embedding_weight(model)


def local_vocab(vocab: int, tp: int, index: int) -> int:
    """Rows of a vocabulary of ``vocab`` that tensor-parallel rank ``index`` holds (torch.chunk's split, uneven when ``tp`` does not divide it)."""
    return torch.empty(vocab, device="meta").chunk(tp)[index].numel()


def vocab_parallel_loss(logits: torch.Tensor, targets: torch.Tensor, tp_mesh, vocab: int) -> torch.Tensor:
    """Cross entropy over logits sharded on the vocabulary (call under ``loss_parallel()``):
    ``logits`` is this rank's local shard of a ``vocab``-wide output."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(logits, DTensor):
        shape = (*logits.shape[:-1], vocab)
        stride = torch.empty(shape, device="meta").stride()
        logits = DTensor.from_local(logits, tp_mesh, [Shard(logits.dim() - 1)], run_check=False, shape=shape, stride=stride)
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


def tensor_parallel(setup: Setup) -> Trainer:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    tp_mesh = init_device_mesh(setup.device.type, (setup.world,), mesh_dim_names=("tp",))
    case = setup.build()
    tokens, targets = case.inputs[0].to(setup.device), case.targets.to(setup.device)
    model = case.model
    apply_megatron_tp(model, tp_mesh)
    optimizer = make_optimizer(model.parameters())

    def forward_backward():
        with loss_parallel():
            vocab_parallel_loss(model(tokens), targets, tp_mesh, model.config.vocab_size).backward()

    return Trainer(training_step(optimizer, forward_backward), {"plan": "Megatron, vocab-parallel embedding + head, loss_parallel, no sequence parallelism"}, [model, optimizer])


# -- pipeline -------------------------------------------------------------------------
class PipelineStageModule(nn.Module):
    """Blocks ``[first_block, end_block)`` of ``model``; the first stage embeds, the last
    applies the final norm and the head. The model keeps only what this stage runs."""

    def __init__(self, model: nn.Module, first_block: int, end_block: int, is_first: bool, is_last: bool):
        super().__init__()
        fam = family(model)
        blocks = fam.blocks(model)
        setattr(model, fam.blocks_attr, nn.ModuleList(blocks[first_block:end_block]))
        tied_weight = _embedding_weight(model) if fam.tied(model) else None
        for name in () if is_first else fam.embedding_names():
            setattr(model, name, None)
        for name in () if is_last else fam.head_names():
            setattr(model, name, None)
        if tied_weight is not None and is_last and not is_first:
            _head(model).weight = tied_weight  # the last stage keeps the head's (tied) weight
        self.model, self.family, self.is_first, self.is_last = model, fam, is_first, is_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.family.embed(self.model, x) if self.is_first else x
        for block in self.family.blocks(self.model):
            h = self.family.run_block(self.model, block, h)
        return self.family.head(self.model, h) if self.is_last else h


def even_split(layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous block ranges, as equal as the count allows (earlier stages get the extra)."""
    if stages > layers:
        raise ValueError(f"{stages} pipeline stages need at least {stages} blocks, the model has {layers}")
    base, extra = divmod(layers, stages)
    bounds, start = [], 0
    for s in range(stages):
        end = start + base + (1 if s < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _pipeline_trainer(
    setup: Setup, *, pp: int, pp_index: int, pp_group, microbatches: int, local_batch: int, batch_index: int, batch_parts: int,
    tp_mesh=None, dp_mesh=None, tied_group=None,
) -> Trainer:
    """A pipeline rank's trainer (shared by the pipeline and 3-D layouts)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B
    from torch.distributed.tensor.parallel import loss_parallel

    case = setup.build()
    tokens, targets = _local_batch(case, batch_parts, batch_index, setup.device)
    model = case.model
    fam = family(model)
    layers = len(fam.blocks(model))
    first_block, end_block = even_split(layers, pp)[pp_index]
    is_first, is_last = pp_index == 0, pp_index == pp - 1
    stage = PipelineStageModule(model, first_block, end_block, is_first, is_last)
    del case
    if tp_mesh is not None:
        apply_megatron_tp(model, tp_mesh)
    if dp_mesh is not None and dp_mesh.size() > 1:
        fully_shard = fully_shard_function()
        for block in fam.blocks(model):
            fully_shard(block, mesh=dp_mesh, reshard_after_forward=False)
        fully_shard(stage, mesh=dp_mesh, reshard_after_forward=False)

    micro = local_batch // microbatches
    T = tokens.shape[1]
    d_model = model.config.d_model
    vocab = model.config.vocab_size
    local_vocab_rows = local_vocab(vocab, tp_mesh.size(), tp_mesh.get_local_rank()) if tp_mesh is not None else vocab
    dtype = next(stage.parameters()).dtype
    # The activation between stages carries a gradient back: saying so (requires_grad) is
    # what makes torch send it from the receiving stage and wait for it in the sending one.
    hidden = torch.empty(micro, T, d_model, dtype=dtype, device=setup.device, requires_grad=True)
    input_args = torch.empty(micro, T, dtype=torch.long, device=setup.device) if is_first else hidden
    output_args = torch.empty(micro, T, local_vocab_rows, dtype=dtype, device=setup.device) if is_last else hidden
    pipeline_stage = PipelineStage(stage, pp_index, pp, setup.device, input_args=input_args, output_args=output_args, group=pp_group)
    if tp_mesh is not None:
        def loss_fn(logits, y):
            return vocab_parallel_loss(logits, y, tp_mesh, vocab)
    else:
        loss_fn = language_model_loss
    schedule = Schedule1F1B(pipeline_stage, microbatches, loss_fn=loss_fn)
    optimizer = make_optimizer(stage.parameters())
    tied = fam.tied(model) and pp > 1 and (is_first or is_last)

    def forward_backward():
        kwargs = {"target": targets, "losses": []} if is_last else {}
        args = (tokens,) if is_first else ()
        if tp_mesh is not None:
            with loss_parallel():
                schedule.step(*args, **kwargs)
        else:
            schedule.step(*args, **kwargs)
        if tied:
            weight = _embedding_weight(model) if is_first else _head(model).weight
            dist.all_reduce(_local_gradient_like_weight(weight), group=tied_group)

    detail = {"microbatches": microbatches, "schedule": "1f1b", "split": even_split(layers, pp), "tied_gradient_sync": bool(fam.tied(model) and pp > 1)}
    return Trainer(training_step(optimizer, forward_backward), detail, [stage, schedule, optimizer, pipeline_stage])


def _local_gradient_like_weight(weight: nn.Parameter) -> torch.Tensor:
    """This rank's part of ``weight.grad``, laid out as the weight is. Under tensor parallelism
    the vocabulary-parallel embedding's gradient comes back from backward replicated, while
    the head's is sharded like its weight: the two stages of a tied weight would all-reduce
    tensors of different sizes (a collective mismatch that aborts gloo and hangs NCCL), so a
    gradient whose placement differs from the weight's is redistributed to it first."""
    grad = weight.grad
    if not _is_dtensor(grad):
        return grad
    if tuple(grad.placements) != tuple(weight.placements):
        grad = grad.redistribute(weight.device_mesh, weight.placements)
        weight.grad = grad
    return grad.to_local()


def _tied_group(first_rank: int, last_rank: int):
    """Megatron's embedding group; every rank must call new_group in the same order."""
    return dist.new_group(sorted({first_rank, last_rank}))


def pipeline(setup: Setup, microbatches: int) -> Trainer:
    """``pp = world``: one stage per rank, the whole global batch through each pipeline."""
    tied_group = _tied_group(0, setup.world - 1)
    return _pipeline_trainer(
        setup, pp=setup.world, pp_index=setup.rank, pp_group=dist.group.WORLD, microbatches=microbatches,
        local_batch=setup.batch_size, batch_index=0, batch_parts=1, tied_group=tied_group,
    )


def megatron_3d(setup: Setup, *, tp: int, pp: int, microbatches: int) -> Trainer:
    """Megatron's 3-D layout: rank = (pp_index * dp + dp_index) * tp + tp_index (tp innermost,
    inside the node); each data-parallel replica takes its slice of the batch."""
    from torch.distributed.device_mesh import init_device_mesh

    if setup.world % (tp * pp):
        raise ValueError(f"tp={tp} x pp={pp} does not divide {setup.world} ranks")
    dp = setup.world // (tp * pp)
    mesh = init_device_mesh(setup.device.type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
    pp_index, dp_index, tp_index = setup.rank // (dp * tp), (setup.rank // tp) % dp, setup.rank % tp
    tied_group = None
    for d in range(dp):  # every rank creates every embedding group, in the same order
        for t in range(tp):
            group = _tied_group(d * tp + t, ((pp - 1) * dp + d) * tp + t)
            if (d, t) == (dp_index, tp_index):
                tied_group = group
    trainer = _pipeline_trainer(
        setup, pp=pp, pp_index=pp_index, pp_group=mesh.get_group("pp"), microbatches=microbatches,
        local_batch=setup.batch_size // dp, batch_index=dp_index, batch_parts=dp,
        tp_mesh=mesh["tp"] if tp > 1 else None, dp_mesh=mesh["dp"], tied_group=tied_group,
    )
    trainer.detail.update({"mesh": {"pp": pp, "dp": dp, "tp": tp}, "dp": "FSDP2 over dp (reshard_after_forward=False)" if dp > 1 else "none"})
    return trainer

