"""Tensor-parallel codegen and its collectives, in one process.

* The code generated for a GPT at tp=2: sliced parameters under the original names, the
  collectives in Megatron's order, view rewrites, readable source.
* Each collective of partc.runtime.collectives, forward and backward, with every rank a
  thread of this process (ThreadedGroup).
* Whole models run rank by rank as threads against the single-device model: outputs,
  every gradient (sliced by the parameter's slice rule) and the collectives per step,
  for the Megatron plans of the parity tests and for plans the solver makes on other
  clusters (weights gathered as in FSDP, sequence parallelism keeping only the shard of a
  gathered activation for backward).
* The generated code propagates fake tensors with no process group, and every node's
  shape is the local shape its layout says.
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import re
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from partc.errors import PartcError, PlanMismatchError
from partc.passes.layouts import local_shape
from partc.passes.propagate import fake_values
from partc.passes.tp_codegen import TensorParallelModule, emit_tensor_parallel, generated_source
from partc.runtime import collectives as C
from partc.runtime.collectives import TensorParallelGroup, ThreadedGroup, run_threaded

_spec = importlib.util.spec_from_file_location("tp_worker", Path(__file__).parent / "distributed" / "tp_worker.py")
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)

RTOL, ATOL = W.RTOL, W.ATOL


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks are threads already
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpt_tp2():
    model, inputs, targets, loss_fn = W.build("gpt")
    # SGD: no optimizer state whose update time sharding would halve, so on this tiny model
    # the embeddings stay replicated and the plan is exactly Megatron's (with AdamW the ILP
    # also shards the embeddings' hidden dim and gathers their sum: cheaper here, equally valid)
    gm, plan = W.make_plan(model, inputs, 2, optimizer="sgd")
    return model, inputs, gm, plan


# -- the generated code ----------------------------------------------------------------------------
def test_parameters_are_sliced_under_their_original_names(gpt_tp2):
    model, inputs, gm, plan = gpt_tp2
    before = gm.code
    full = model.state_dict()
    for rank in range(2):
        tpm = emit_tensor_parallel(gm, plan, rank=rank, tp=2, state_dict=model.state_dict(keep_vars=True))
        params = dict(tpm.module.named_parameters())
        assert sorted(tpm.module.state_dict()) == sorted(full)
        assert params["blocks.0.attn.qkv.weight"].shape == (96, 64)  # q, k, v rows: 64 each, half per rank
        assert params["blocks.0.attn.proj.weight"].shape == (64, 32)
        assert params["blocks.0.mlp.fc.weight"].shape == (128, 64)
        assert params["blocks.0.mlp.proj.weight"].shape == (64, 128)
        assert params["blocks.0.ln_1.weight"].shape == (64,)
        assert params["lm_head.weight"].shape == (64, 64)  # column-parallel LM head: half the vocabulary
        # the fused qkv weight keeps this rank's slice of q, of k and of v
        q, k, v = full["blocks.0.attn.qkv.weight"].chunk(3)
        want = torch.cat([t.chunk(2)[rank] for t in (q, k, v)])
        assert torch.equal(params["blocks.0.attn.qkv.weight"], want)
        assert tpm.parameters["blocks.0.attn.qkv.weight"].blocks == 3
        assert torch.equal(params["blocks.0.attn.proj.weight"], full["blocks.0.attn.proj.weight"].chunk(2, dim=1)[rank])
        assert params["blocks.0.ln_1.weight"].data_ptr() != model.blocks[0].ln_1.weight.data_ptr()  # the module owns its tensors
    assert gm.code == before  # the input graph is not changed


def collectives_in(code: str) -> list[str]:
    names = "|".join(C.GENERATED_CODE_FUNCTIONS)
    return re.findall(rf"= ({names})\(", code)


def test_collectives_appear_in_megatron_order(gpt_tp2):
    model, inputs, gm, plan = gpt_tp2
    code = emit_tensor_parallel(gm, plan, rank=0, tp=2).module.code
    block = ["copy_to_tp", "reduce_from_tp", "copy_to_tp", "reduce_from_tp"]
    # per block: f before qkv, g after the attention projection, f before fc, g after the
    # MLP projection; then f before the column-parallel LM head and the gather of its logits
    assert collectives_in(code) == block * 2 + ["copy_to_tp", "gather_from_tp"]
    assert "layer_norm_copy = copy_to_tp(layer_norm, tp_group)" in code
    assert "linear_1_reduced = reduce_from_tp(linear_1, tp_group)" in code
    assert "linear_8_gathered = gather_from_tp(linear_8, 2, tp_group)" in code
    assert plan.collectives_per_step() == {"forward": {"all_gather": 1, "all_reduce": 4}, "backward": {"all_reduce": 5}}


def test_view_rewrites_are_visible(gpt_tp2):
    model, inputs, gm, plan = gpt_tp2
    code = emit_tensor_parallel(gm, plan, rank=1, tp=2).module.code
    assert "getitem.view(size_1, size_2, 4, 16)" in gm.code
    assert "getitem.view(size_1, size_2, 2, 16)" in code  # 4 heads -> 2 per rank
    assert "transpose_3.reshape(size_1, size_2, 32)" in code  # 64 features -> 32


def test_generated_source_is_readable(gpt_tp2):
    model, inputs, gm, plan = gpt_tp2
    tpm = emit_tensor_parallel(gm, plan, rank=1, tp=2)
    source = generated_source(tpm)
    assert source == tpm.source() == generated_source(tpm.module)
    assert source.startswith("# partc tensor-parallel code: rank 1 of 2 (mesh dimension 'tp')")
    assert re.search(r"#\s+blocks\.0\.attn\.qkv\.weight\s+S\(0\) in 3 blocks\s+\[192, 64\] -> \[96, 64\]", source)
    assert re.search(r"#\s+linear_1 \(blocks\.0\.attn\.proj\)\s+row\(S\(2\), S\(1\) -> P\)", source)
    assert "tp_group = self.tp_group" in source
    assert "copy_to_tp(" in source and "reduce_from_tp(" in source
    assert "partc_runtime" not in source  # short names, not fx's mangled module paths
    compile(tpm.module.code, "<generated>", "exec")


def test_tied_weights_keep_both_names():
    model, inputs, targets, loss_fn = W.build("gpt-tied")
    gm, plan = W.make_plan(model, inputs, 2)
    tpm = emit_tensor_parallel(gm, plan, rank=0, tp=2, state_dict=model.state_dict(keep_vars=True))
    state = tpm.module.state_dict(keep_vars=True)
    assert sorted(state) == sorted(model.state_dict())
    assert state["lm_head.weight"] is state["wte.weight"]  # one local tensor behind both names
    assert tpm.parameters["lm_head.weight"] == tpm.parameters["wte.weight"]
    assert "lm_head.weight" not in dict(tpm.module.named_parameters())
    # without the model's state dict the module has the names the graph reads
    plain = emit_tensor_parallel(gm, plan, rank=0, tp=2)
    assert "lm_head.weight" not in plain.module.state_dict()


def test_non_persistent_buffers_stay_out_of_the_state_dict():
    model, inputs, targets, loss_fn = W.build("llama")
    gm, plan = W.make_plan(model, inputs, 2)
    tpm = emit_tensor_parallel(gm, plan, rank=0, tp=2, state_dict=model.state_dict(keep_vars=True))
    assert sorted(tpm.module.state_dict()) == sorted(model.state_dict())
    assert isinstance(tpm.module.rope_cos, torch.Tensor)


def test_vocabulary_parallel_lowering_is_visible():
    model, inputs, targets, loss_fn = W.build("gpt-loss")
    gm, plan = W.make_plan(model, inputs, 2)
    code = emit_tensor_parallel(gm, plan, rank=1, tp=2).module.code
    assert re.search(r"embedding = vocab_parallel_embedding\(idx, model_wte_weight, tp_group\)", code)
    assert re.search(r"cross_entropy = vocab_parallel_cross_entropy\(\w+, \w+, tp_group\)", code)
    assert plan.collectives_per_step()["forward"]["all_reduce"] == 7  # 2 in the loss, 1 after the embedding, 4 in the blocks


def test_plan_for_another_degree_is_refused(gpt_tp2):
    model, inputs, gm, plan = gpt_tp2
    with pytest.raises(PlanMismatchError, match="tp=2, not tp=4"):
        emit_tensor_parallel(gm, plan, rank=0, tp=4)
    with pytest.raises(PartcError, match="rank must be in 0..1"):
        emit_tensor_parallel(gm, plan, rank=2, tp=2)


def test_unbound_group_says_how_to_bind(gpt_tp2):
    model, inputs, gm, plan = gpt_tp2
    tpm = emit_tensor_parallel(gm, plan, rank=0, tp=2)
    with pytest.raises(PartcError, match=r"tp_group\.bind"):
        tpm.module(*inputs)
    with pytest.raises(PlanMismatchError):
        tpm.group.bind(ThreadedGroup(4))


def test_generated_code_propagates_local_shapes(gpt_tp2):
    """Fake tensors through the generated code, no process group: every node that the
    plan lays out has the local shape of its layout."""
    model, inputs, gm, plan = gpt_tp2
    tpm = emit_tensor_parallel(gm, plan, rank=0, tp=2)
    values = fake_values(tpm.module, inputs)
    assert tpm.counter.per_step() == {"forward": {}, "backward": {}}  # shapes only: nothing ran
    checked = 0
    for node, value in values.items():
        original = next((n for n in gm.graph.nodes if n.name == node.name), None)
        if original is None or not plan.strategies.get(node.name, None) or not plan.strategies[node.name].outputs:
            continue
        if not isinstance(value, torch.Tensor):
            continue
        layout = plan.strategies[node.name].outputs[0]
        assert tuple(value.shape) == local_shape(original.meta["val"].shape, layout, 2), node.name
        checked += 1
    assert checked > 50


# -- the collectives, rank by rank -----------------------------------------------------------------
def run_ranks(tp: int, fn):
    """fn(rank, group) on every rank of a ThreadedGroup of ``tp``; the results in rank order."""
    world = ThreadedGroup(tp, timeout=30)
    groups = [TensorParallelGroup(r, tp, group=world) for r in range(tp)]
    return run_threaded(lambda r: fn(r, groups[r]), tp, world), groups


def per_rank(seed: int, tp: int, *shape):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for _ in range(tp)]


@pytest.mark.parametrize("tp", [2, 4])
def test_copy_to_tp_and_reduce_from_tp(tp):
    xs, grads = per_rank(0, tp, 4, 8), per_rank(1, tp, 4, 8)

    def body(r, g):
        x = xs[r].clone().requires_grad_()
        copied, reduced = C.copy_to_tp(x, g), C.reduce_from_tp(x, g)
        (copied * grads[r]).sum().backward()
        copy_grad = x.grad.clone()
        x.grad = None
        (reduced * grads[r]).sum().backward()
        return copied.detach(), copy_grad, reduced.detach(), x.grad

    results, groups = run_ranks(tp, body)
    for r, (copied, copy_grad, reduced, reduce_grad) in enumerate(results):
        assert torch.equal(copied, xs[r])  # f: identity forward
        torch.testing.assert_close(copy_grad, sum(grads))  # f: all-reduce backward
        torch.testing.assert_close(reduced, sum(xs))  # g: all-reduce forward
        assert torch.equal(reduce_grad, grads[r])  # g: identity backward
    assert groups[0].counter.per_step() == {"forward": {"all_reduce": 1}, "backward": {"all_reduce": 1}}


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("tp", [2, 4])
def test_gather_scatter_reduce_scatter(tp, blocks):
    pieces = per_rank(2, tp, 3 * blocks, 5)  # each rank's S(0) shard
    full = torch.cat([torch.cat([p.chunk(blocks)[b] for p in pieces]) for b in range(blocks)])
    replicated_grad = per_rank(3, 1, *full.shape)[0]
    partial_grads = per_rank(4, tp, *full.shape)

    def body(r, g):
        x = pieces[r].clone().requires_grad_()
        gathered = C.gather_from_tp(x, 0, g, blocks=blocks)
        (gathered * replicated_grad).sum().backward()
        slice_grad, x.grad = x.grad, None
        gathered_sp = C.gather_from_sp(x, 0, g, blocks=blocks)
        (gathered_sp * partial_grads[r]).sum().backward()
        whole = full.clone().requires_grad_()
        scattered = C.scatter_to_tp(whole, 0, g, blocks=blocks)
        (scattered * pieces[r]).sum().backward()
        partial = partial_grads[r].clone().requires_grad_()
        reduce_scattered = C.reduce_scatter_to_tp(partial, 0, g, blocks=blocks)
        (reduce_scattered * pieces[r]).sum().backward()
        return gathered.detach(), slice_grad, x.grad, scattered.detach(), whole.grad, reduce_scattered.detach(), partial.grad

    results, groups = run_ranks(tp, body)
    mine = lambda t, r: C.shard_of(t, 0, r, tp, blocks)  # noqa: E731
    for r, (gathered, slice_grad, rs_grad, scattered, scatter_grad, reduce_scattered, partial_grad) in enumerate(results):
        assert torch.equal(gathered, full)
        assert torch.equal(slice_grad, mine(replicated_grad, r))
        torch.testing.assert_close(rs_grad, mine(sum(partial_grads), r))
        assert torch.equal(scattered, pieces[r])
        assert torch.equal(scatter_grad, full)  # all-gather of every rank's gradient piece
        torch.testing.assert_close(reduce_scattered, mine(sum(partial_grads), r))
        assert torch.equal(partial_grad, full)
    assert groups[1].counter.per_step() == {
        "forward": {"all_gather": 2, "reduce_scatter": 1},
        "backward": {"all_gather": 2, "reduce_scatter": 1},
    }


@pytest.mark.parametrize("tp", [2, 4])
def test_all_to_all_partial_and_pad(tp):
    full = per_rank(5, 1, 4 * tp, 2 * tp)[0]
    grad = per_rank(6, 1, 4 * tp, 2 * tp)[0]

    def body(r, g):
        rows = C.shard_of(full, 0, r, tp).clone().requires_grad_()
        columns = C.all_to_all_tp(rows, 0, 1, g)
        (columns * C.shard_of(grad, 1, r, tp)).sum().backward()
        x = full.clone().requires_grad_()
        partial = C.to_partial(x, g)
        (partial * grad).sum().backward()
        piece = C.shard_of(full, 1, r, tp).clone().requires_grad_()
        padded = C.pad_to_partial(piece, 1, g)
        (padded * grad).sum().backward()
        return columns.detach(), rows.grad, partial.detach(), x.grad, padded.detach(), piece.grad

    results, groups = run_ranks(tp, body)
    assert torch.equal(sum(r[2] for r in results), full)  # partial: the sum over ranks is x once
    assert torch.equal(sum(r[4] for r in results), full)  # pad: the pieces in place
    for r, (columns, rows_grad, partial, partial_grad, padded, pad_grad) in enumerate(results):
        assert torch.equal(columns, C.shard_of(full, 1, r, tp))
        assert torch.equal(rows_grad, C.shard_of(grad, 0, r, tp))  # the all-to-all back
        assert torch.equal(partial_grad, grad)  # identity backward
        assert torch.equal(pad_grad, C.shard_of(grad, 1, r, tp))
    assert groups[0].counter.per_step() == {"forward": {"all_to_all": 1}, "backward": {"all_to_all": 1}}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_cross_entropy(tp, reduction):
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(12, 8 * tp, generator=generator) * 3
    target = torch.randint(0, 8 * tp, (12,), generator=generator)
    target[3] = -100  # ignored
    upstream = torch.randn(12, generator=generator) if reduction == "none" else torch.tensor(1.7)
    whole = logits.clone().requires_grad_()
    want = F.cross_entropy(whole, target, reduction=reduction)
    (want * upstream).sum().backward()

    def body(r, g):
        mine = C.shard_of(logits, 1, r, tp).clone().requires_grad_()
        loss = C.vocab_parallel_cross_entropy(mine, target, g, reduction=reduction)
        (loss * upstream).sum().backward()
        return loss.detach(), mine.grad

    results, groups = run_ranks(tp, body)
    for r, (loss, grad) in enumerate(results):
        torch.testing.assert_close(loss, want.detach(), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(grad, C.shard_of(whole.grad, 1, r, tp), rtol=RTOL, atol=ATOL)
    assert groups[0].counter.per_step() == {"forward": {"all_reduce": 2}, "backward": {}}


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("loss", ["padded", "weighted", "smoothed", "nll"])
def test_divide_by_kept_targets_gives_torchs_mean_when_ranks_keep_unequal_targets(tp, loss):
    """Rank r's summed loss over its slice of the samples, divided by the batch's normaliser:
    the ranks' results add up to torch's "mean" and its gradient, although the padding
    (ignored targets) lies in the first half of the batch only."""
    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(8 * tp, 5, generator=generator) * 2
    target = torch.randint(1, 5, (8 * tp,), generator=generator)
    target[: 6 * tp] = torch.where(torch.arange(6 * tp) % 3 == 0, target[: 6 * tp], -100)  # rank 0 keeps fewest
    options = {
        "padded": {},
        "weighted": {"weight": torch.tensor([0.3, 1.0, 2.5, 0.7, 1.9])},
        "smoothed": {"weight": torch.tensor([0.3, 1.0, 2.5, 0.7, 1.9]), "label_smoothing": 0.2},
        "nll": {"weight": torch.tensor([0.3, 1.0, 2.5, 0.7, 1.9]), "ignore_index": 2},
    }[loss]
    if loss == "nll":
        target[target == -100] = 2

    def loss_of(x, t, reduction):
        if loss == "nll":
            return F.nll_loss(x.log_softmax(-1), t, reduction=reduction, **options)
        return F.cross_entropy(x, t, reduction=reduction, **options)

    whole = logits.clone().requires_grad_()
    want = loss_of(whole, target, "mean")
    want.backward()
    divide = {k: v for k, v in options.items() if k in ("weight", "ignore_index")}

    def body(r, g):
        mine = C.shard_of(logits, 0, r, tp).clone().requires_grad_()
        part = C.divide_by_kept_targets(loss_of(mine, C.shard_of(target, 0, r, tp), "sum"), C.shard_of(target, 0, r, tp), g, **divide)
        part.backward()
        return part.detach(), mine.grad

    results, groups = run_ranks(tp, body)
    torch.testing.assert_close(sum(p for p, _ in results), want.detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.cat([grad for _, grad in results]), whole.grad, rtol=RTOL, atol=ATOL)
    assert groups[0].counter.per_step() == {"forward": {"all_reduce": 1}, "backward": {}}
    # what the old lowering computed, each rank's own mean / tp, is not torch's mean here
    own_means = sum(loss_of(C.shard_of(logits, 0, r, tp), C.shard_of(target, 0, r, tp), "mean") / tp for r in range(tp))
    assert not torch.allclose(own_means, want.detach(), rtol=1e-3)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", W.LOSS_MODELS)
def test_batch_parallel_losses_match_the_single_device_model(name, tp):
    """The token classifiers of tests/test_tp_loss_parity.py, ranks as threads: padded
    labels, class weights, label smoothing, nll_loss; the loss runs batch-parallel."""
    failures, plan = simulate(name, tp, steps=2, cluster=W.favourable_cluster(*W.CLUSTERS["fsdp"]))
    (loss,) = [s for n, s in plan.strategies.items() if n.startswith(("cross_entropy", "nll_loss"))]
    assert loss.name == "batch_parallel" and loss.comm, loss
    assert not failures, failures[:10]


def test_vocab_parallel_cross_entropy_of_a_batch_of_padding_is_torchs():
    """Every target ignored: torch's "mean" is 0 / 0 (nan) and its gradient zero, not nan
    (a nan gradient would poison every parameter through the optimizer)."""
    tp = 2
    logits = torch.randn(6, 4 * tp)
    target = torch.full((6,), -100)
    whole = logits.clone().requires_grad_()
    F.cross_entropy(whole, target).backward()
    assert torch.equal(whole.grad, torch.zeros_like(logits))

    def body(r, g):
        mine = C.shard_of(logits, 1, r, tp).clone().requires_grad_()
        loss = C.vocab_parallel_cross_entropy(mine, target, g)
        loss.backward()
        return loss.detach(), mine.grad

    for loss, grad in run_ranks(tp, body)[0]:
        assert loss.isnan() and torch.equal(grad, torch.zeros_like(grad))


def test_vocab_parallel_embedding_sums_to_the_lookup():
    tp = 2
    weight = torch.randn(10, 4)
    idx = torch.tensor([[0, 4, 5, 9], [9, 1, 6, 3]])
    results, _ = run_ranks(tp, lambda r, g: C.vocab_parallel_embedding(idx, C.shard_of(weight, 0, r, tp), g))
    torch.testing.assert_close(sum(results), F.embedding(idx, weight))


def test_keep_shard_for_backward_frees_the_gathered_input():
    """Megatron's sequence parallelism: the linear keeps only the shard of its gathered
    input and all-gathers it again in backward."""
    tp = 2
    xs, ws = per_rank(8, tp, 3, 4, 8), per_rank(9, 1, 6, 8)
    full_x, w = torch.cat(xs), ws[0]
    whole_w = w.clone().requires_grad_()
    F.linear(full_x, whole_w).square().sum().backward()

    def body(r, g):
        x = xs[r].clone().requires_grad_()
        weight = w.clone().requires_grad_()
        gathered = C.gather_from_sp(x, 0, g)
        out = F.linear(gathered, weight)
        C.keep_shard_for_backward(out, g, (gathered, x, 0), inputs=(gathered, weight))
        alive = weakref.ref(gathered)
        del gathered
        gc.collect()
        freed = alive() is None
        out.square().sum().backward()
        return freed, weight.grad

    results, groups = run_ranks(tp, body)
    for freed, grad in results:
        assert freed
        torch.testing.assert_close(grad, whole_w.grad)  # computed from the input gathered again
    assert groups[0].counter.per_step() == {"forward": {"all_gather": 1}, "backward": {"all_gather": 1, "reduce_scatter": 1}}


def test_a_failing_rank_releases_the_others():
    def body(r, g):
        if r == 1:
            raise ValueError("rank 1 failed")
        return C.reduce_from_tp(torch.ones(2), g)

    with pytest.raises(ValueError, match="rank 1 failed"):
        run_ranks(2, body)


# -- whole models, every rank a thread -------------------------------------------------------------
def simulate(name: str, tp: int, *, steps: int = 1, cluster=None, **plan_options) -> tuple[list[str], object]:
    """Run ``name`` at ``tp`` as threads beside the single-device model; return what differed."""
    model, inputs, targets, loss_fn = W.build(name)
    reference = copy.deepcopy(model)
    gm, plan = W.make_plan(model, inputs, tp, cluster=cluster, **plan_options)
    world = ThreadedGroup(tp, timeout=60)
    modules: list[TensorParallelModule] = [
        emit_tensor_parallel(gm, plan, rank=r, tp=tp, group=world, state_dict=model.state_dict(keep_vars=True)) for r in range(tp)
    ]
    optimizers = [torch.optim.AdamW(m.module.parameters(), lr=W.LR, eps=W.EPS) for m in modules]
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=W.LR, eps=W.EPS)
    reference_params = dict(reference.named_parameters())
    failures: list[str] = []
    for step in range(steps):

        def train(r: int):
            optimizers[r].zero_grad()
            modules[r].counter.reset()
            out = modules[r].module(*inputs)
            (out if loss_fn is None else loss_fn(out, targets)).backward()
            return out.detach()

        outputs = run_threaded(train, tp, world)
        reference_optimizer.zero_grad()
        want = reference(*inputs)
        (want if loss_fn is None else loss_fn(want, targets)).backward()
        for r, (tpm, out) in enumerate(zip(modules, outputs)):
            W.compare(f"step {step} rank {r} output", out, want.detach(), failures)
            if tpm.counter.per_step() != plan.collectives_per_step():
                failures.append(f"rank {r} ran {tpm.counter.per_step()}, the plan predicts {plan.collectives_per_step()}")
            for pname, p in tpm.module.named_parameters():
                W.compare(f"step {step} rank {r} grad {pname}", p.grad, tpm.local(pname, reference_params[pname].grad), failures)
        for optimizer in optimizers:
            optimizer.step()
        reference_optimizer.step()
    for r, tpm in enumerate(modules):
        for pname, p in tpm.module.named_parameters():
            W.compare(f"rank {r} param {pname}", p.detach(), tpm.local(pname, reference_params[pname].detach()), failures)
    return failures, plan


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", W.MODELS)
def test_megatron_plans_match_the_single_device_model(name, tp):
    failures, plan = simulate(name, tp, steps=2)
    assert not failures, failures[:10]


def reshard_kinds(plan) -> set[tuple]:
    return {(r.forward, r.backward, r.regather) for r in plan.reshards}


def test_weights_gathered_as_in_fsdp():
    """Slow devices, very fast links: the solver shards the weights and all-gathers them
    before batch-parallel linears (reduce-scatter of their gradients), all-to-alls between
    hidden- and batch-sharded activations."""
    failures, plan = simulate("gpt", 2, cluster=W.favourable_cluster(flops=1e9, latency=1e-9, bandwidth=1e12))
    assert not failures, failures[:10]
    kinds = reshard_kinds(plan)
    assert ("all_gather", "reduce_scatter", False) in kinds and ("all_to_all", "all_to_all", False) in kinds


def test_sequence_parallel_regathers_in_backward():
    failures, plan = simulate("gpt", 4, cluster=W.favourable_cluster(flops=1e10, latency=1e-9, bandwidth=1e10))
    assert not failures, failures[:10]
    assert any(r.regather for r in plan.reshards)
    assert ("reduce_scatter", "all_gather", False) in reshard_kinds(plan)


def test_llama_sequence_parallel_and_all_to_all():
    failures, plan = simulate("llama", 2, cluster=W.favourable_cluster(flops=1e9, latency=1e-9, bandwidth=1e12))
    assert not failures, failures[:10]
    assert {("all_to_all", "all_to_all", False), ("reduce_scatter", "all_gather", False)} <= reshard_kinds(plan)


def test_a_copy_shares_the_group_and_counts_on_its_own(gpt_tp2):
    model, inputs, gm, plan = gpt_tp2
    world = ThreadedGroup(2)
    modules = [emit_tensor_parallel(gm, plan, rank=r, tp=2, group=world).module for r in range(2)]
    copies = [copy.deepcopy(m) for m in modules]
    outputs = run_threaded(lambda r: copies[r](*inputs).detach(), 2, world)
    torch.testing.assert_close(outputs[0], model(*inputs).detach(), rtol=RTOL, atol=ATOL)
    assert copies[0].tp_group.counter.per_step()["forward"] == {"all_gather": 1, "all_reduce": 4}
    assert modules[0].tp_group.counter.per_step()["forward"] == {}


def test_pipeline_stages_cut_from_a_tensor_parallel_module(gpt_tp2):
    """pp x tp: split_stages cuts the generated module (inserted nodes belong to their
    producer's layer); a sharded value crossing the cut travels as the local shard."""
    from partc.passes.split_stages import split_stages

    model, inputs, gm, plan = gpt_tp2
    world = ThreadedGroup(2)
    modules = [emit_tensor_parallel(gm, plan, rank=r, tp=2, group=world).module for r in range(2)]
    layers = len(gm.meta["partc"].layers)
    stage_of_layer = [0] * (layers // 2) + [1] * (layers - layers // 2)
    stages = [split_stages(m, stage_of_layer, inputs) for m in modules]

    def run(r):
        values = stages[r][0].module(*inputs)
        return stages[r][1].module(*(values if isinstance(values, tuple) else (values,))).detach()

    for out in run_threaded(run, 2, world):
        torch.testing.assert_close(out, model(*inputs).detach(), rtol=RTOL, atol=ATOL)
