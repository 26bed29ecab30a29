"""The failure catalogue (issue #6): one test per bad input a partition compiler meets.

Each entry either works (and the test shows that it computes what the single-device model
computes) or raises a :class:`partc.PartcError` whose message the test matches: the pass,
and where the entry concerns a node, the node, the module, the user's source line and the
fix. Entries in the order of issue #6; ../shared/brief/anchors.md lists the same inputs.

The entries that must work across real processes (tied weights, in-place ops after a cut,
inputs only a later stage reads, a branch on the batch size under data parallelism) run in
one torchrun launch of tests/distributed/catalogue_worker.py; a killed rank has its own
launch (tests/distributed/killed_rank_worker.py). Both are marked slow.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pulp
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import partc
from parity import case_key, free_port, run_parity, skip_if_refused
from partc.models import GPT, GPTConfig, build
from partc.passes.layouts import Shard, view_output_layout
from partc.passes.split_stages import split_stages

CPU2 = partc.Cluster.preset("cpu", devices_per_node=2)
GiB = 2**30
DISTRIBUTED = Path(__file__).parent / "distributed"
sys.path.insert(0, str(DISTRIBUTED))
import catalogue_worker  # the models the torchrun cases train

def mse(outputs, targets):
    return F.mse_loss(outputs, targets)


def assert_located(
    error: partc.PartcError, *, pass_name: str, module: str | None = None, source: str | None = None, node: str | None = None, file: str = "test_failure_catalogue.py"
) -> str:
    """The message names the pass, and where given the module, the user's source line and
    the fx node; every located error says how to fix it. Returns the message."""
    message = str(error)
    assert f"\n  pass:   {pass_name}" in message
    assert "\n  fix:    " in message and error.context.fix
    if module is not None:
        assert f"\n  module: {module or '<root module>'}" in message
    if source is not None:
        assert re.search(rf"\n  source: {re.escape(file)}:\d+  {re.escape(source)}", message), message
    if node is not None:
        assert f"\n  node:   %{node} " in message
    return message


class Chain(nn.Module):
    """Four linear blocks: enough layers to cut into pipeline stages."""

    def __init__(self, width: int = 8, depth: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


def compile_in_one_process(model: nn.Module, inputs, **options):
    """partc.compile outside torchrun: the plan's stages run one after another here."""
    return partc.compile(model, CPU2, inputs, loss_fn=mse, **options)


# -- the multi-process entries, in one torchrun launch ------------------------------------------
CATALOGUE_CASES = {
    "tied": {"model": "tied-gpt", "mesh": {"pp": 2}, "schedule": "1f1b", "microbatches": 4},
    "inplace": {"model": "inplace-after-cut", "mesh": {"pp": 2}, "microbatches": 2},
    "late_input": {"model": "late-input", "mesh": {"pp": 2}, "microbatches": 2, "loss_in_graph": True},
    "batch_branch_dp": {"model": "batch-branch", "mesh": {"dp": 2}},
}


@pytest.fixture(scope="module")
def catalogue_verdicts():
    """{entry: [one verdict per rank]} from one torchrun launch of catalogue_worker.py."""
    verdicts = run_parity(list(CATALOGUE_CASES.values()), nproc=2, timeout=300, worker=DISTRIBUTED / "catalogue_worker.py")
    return {entry: verdicts.get(case_key(case), []) for entry, case in CATALOGUE_CASES.items()}


def assert_parity(ranks: list[dict]) -> None:
    assert len(ranks) == 2, f"only {len(ranks)} of 2 ranks reported"
    failures = {r["rank"]: r["failures"] for r in ranks if r["failures"]}
    assert not failures, failures


# == 1. data-dependent control flow ===============================================================
def test_data_dependent_control_flow():
    from test_capture import _Parent as NestedGate  # `if x.sum() > 0` in the submodule inner.gate

    with pytest.raises(partc.TraceError, match="could not capture _Parent") as caught:
        partc.plan(NestedGate(), CPU2, torch.randn(4, 4), mesh={"dp": 2})
    assert_located(caught.value, pass_name="capture", module="inner.gate", source="if x.sum() > 0:", file="test_capture.py")
    assert "torch.where / torch.cond" in caught.value.context.fix


# == 2. shape-dependent branches ==================================================================
class SequenceBranch(nn.Module):
    """Branches on the sequence length: symbolic tracing cannot, torch.export takes the
    branch of the example's shapes (the documented fallback)."""

    def __init__(self):
        super().__init__()
        self.short, self.long = Chain(), Chain()

    def forward(self, x):
        return self.long(x) if x.shape[1] > 4 else self.short(x)


def test_shape_dependent_branches():
    torch.manual_seed(0)
    model, x = SequenceBranch(), torch.randn(4, 6, 8)
    plan = partc.plan(model, CPU2, x, mesh={"pp": 2}, microbatches=2)
    assert plan.frontend == "torch.export"
    assert "control flow" in plan.fallback_reason  # why symbolic tracing was not used
    read = {n.target for n in plan.graph.graph.nodes if n.op == "get_attr"}
    assert read and all(name.startswith("long.") for name in read)  # the branch x's shape takes, only
    # Run as a pipeline of 2-sample microbatches, it computes what the model computes.
    reference = copy.deepcopy(model)
    pm = compile_in_one_process(model, x, mesh={"pp": 2}, microbatches=2)
    targets = torch.randn(4, 6, 8)
    loss = pm.step(x, targets)
    expected = mse(reference(x), targets)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    grads = dict(reference.named_parameters())
    for name, p in pm.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad)


@pytest.mark.slow
def test_a_branch_on_the_batch_size_under_data_parallel(catalogue_verdicts):
    assert_parity(catalogue_verdicts["batch_branch_dp"])


# == 3. non-tensor arguments and kwargs ===========================================================
class Flags(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, scale: float, use_relu: bool, mask=None):
        y = self.lin(x) * scale
        if mask is not None:
            y = y * mask
        return torch.relu(y) if use_relu else y


class KeywordOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, *, mask):
        return self.lin(x) * mask


class DictInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, batch):
        return self.lin(batch["x"]) + batch["y"]


def test_non_tensor_arguments_and_kwargs():
    torch.manual_seed(0)
    model, x = Flags(), torch.randn(4, 4)
    # Python numbers and flags are traced as the constants given; a keyword left at its
    # default (mask=None) is traced with the default's branch.
    plan = partc.plan(model, CPU2, (x, 2.0, True), mesh={"dp": 2})
    assert next(n.target for n in plan.graph.graph.nodes if n.op == "placeholder") == "x"
    torch.testing.assert_close(plan.graph(x, 2.0, True), model(x, 2.0, True))
    assert not any(n.op == "placeholder" and n.target == "mask" for n in plan.graph.graph.nodes)
    # A required keyword-only argument cannot come from example_inputs.
    with pytest.raises(partc.TraceError, match=r"KeywordOnly\.forward\(\) needs the keyword-only argument\(s\) mask") as caught:
        partc.plan(KeywordOnly(), CPU2, torch.randn(4, 4), mesh={"dp": 2})
    assert_located(caught.value, pass_name="capture", module="")
    assert "give them defaults" in caught.value.context.fix
    # A dict of tensors cannot be split into microbatches or sent between stages.
    batch = {"x": torch.randn(4, 4), "y": torch.randn(4, 4)}
    with pytest.raises(partc.TraceError, match=r"example input 'batch' of DictInput\.forward\(\) is a dict") as caught:
        partc.plan(DictInput(), CPU2, (batch,), mesh={"dp": 2})
    assert_located(caught.value, pass_name="capture", module="")
    assert "as its own forward() argument" in caught.value.context.fix


# == 4. Python-keyword submodule names ============================================================
def test_python_keyword_submodule_names():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module("lambda", nn.Linear(4, 4))

        def forward(self, x):
            return getattr(self, "lambda")(x)

    with pytest.raises(partc.TraceError, match=r"named 'lambda': 'lambda' is a Python keyword") as caught:
        partc.plan(Net(), CPU2, torch.randn(4, 4), mesh={"dp": 2})
    assert_located(caught.value, pass_name="capture", module="lambda")
    assert "rename 'lambda' (e.g. 'lambda_')" in caught.value.context.fix


# == 5. tied weights across stages ================================================================
@pytest.mark.slow
def test_tied_weights_across_stages(catalogue_verdicts):
    ranks = catalogue_verdicts["tied"]
    assert_parity(ranks)  # every gradient each rank holds equals the single-device one, which sums both uses
    held = {r["rank"]: set(r["held"]) for r in ranks}
    # The embedding (stage 0) and the LM head (stage 1) both hold the one tied weight, under one name.
    assert "wte.weight" in held[0] and "wte.weight" in held[1]
    assert "lm_head.weight" not in held[0] | held[1]


# == 6. buffers mutated in forward ================================================================
class Normalised(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh()) for _ in range(4))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_buffers_mutated_in_forward():
    """BatchNorm in a pipeline normalises each microbatch by its own statistics and updates
    the running statistics once per microbatch: the single-device model run on the same
    microbatches with gradient accumulation, buffers included."""
    torch.manual_seed(0)
    model, x, targets = Normalised(), torch.randn(8, 8), torch.randn(8, 8)
    reference = copy.deepcopy(model)
    pm = compile_in_one_process(model, x, mesh={"pp": 2}, microbatches=2)
    before = {name: t.clone() for name, t in pm.state_dict().items() if "running" in name}
    loss = pm.step(x, targets)
    expected = 0.0
    for xs, ts in zip(x.chunk(2), targets.chunk(2)):
        part = mse(reference(xs), ts) / 2
        part.backward()
        expected += part.item()
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    state, reference_state = pm.state_dict(), reference.state_dict()
    assert set(state) == set(reference_state)
    for name, tensor in reference_state.items():
        torch.testing.assert_close(state[name], tensor, msg=name)
    assert all(not torch.equal(before[name], state[name]) for name in before)  # the statistics did move
    assert state["blocks.3.1.num_batches_tracked"].item() == 2  # once per microbatch


# == 7. in-place ops after a cut ==================================================================
@pytest.mark.slow
def test_in_place_ops_after_a_cut(catalogue_verdicts):
    torch.manual_seed(0)
    model, x = catalogue_worker.InPlaceAfterCut(), torch.randn(8, catalogue_worker.WIDTH)
    plan = partc.plan(model, CPU2, x, mesh={"pp": 2}, microbatches=2)
    stages = split_stages(plan.graph, plan.stage_of_layer(), (x[:4],))
    # stage 1 begins with a block whose first op writes the received tensor in place
    assert "mul_" in stages[1].module.code.split("\n    linear")[0]
    assert_parity(catalogue_verdicts["inplace"])


# == 8. inputs needed only by a later stage =======================================================
@pytest.mark.slow
def test_inputs_needed_only_by_a_later_stage(catalogue_verdicts):
    skip_if_refused(CATALOGUE_CASES["late_input"])
    torch.manual_seed(0)
    model = catalogue_worker.LateInput()
    x, offset, targets = torch.randn(8, 16), torch.randn(8, 16), torch.randn(8, 16)
    plan = partc.plan(model, CPU2, (x, offset), loss_fn=mse, example_targets=targets, mesh={"pp": 2}, microbatches=2)
    stages = split_stages(plan.graph, plan.stage_of_layer(), (x[:4], offset[:4], targets[:4]))
    # stage 0 reads only x and relays the offset and the targets to the stage that uses them
    assert stages[0].inputs == ("x", "offset", "targets")
    assert {"offset", "targets"} <= set(stages[0].outputs) and {"offset", "targets"} <= set(stages[1].inputs)
    assert_parity(catalogue_verdicts["late_input"])


# == 9. dropout (the RNG contract of docs/ARCHITECTURE.md, "Randomness") ==========================
class Dropping(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)) for _ in range(4))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_dropout_rng_contract():
    torch.manual_seed(0)
    x, targets = torch.randn(8, 8), torch.randn(8, 8)
    model = Dropping()
    pm = compile_in_one_process(copy.deepcopy(model), x, mesh={"pp": 2}, microbatches=2)

    def loss_with_seed(seed: int) -> float:
        torch.manual_seed(seed)
        return pm.step(x, targets).item()

    # Masks come from the default generator: the same seed gives the same step, another seed
    # another one (dropout is applied, not silently dropped).
    assert loss_with_seed(1) == loss_with_seed(1)
    assert loss_with_seed(1) != loss_with_seed(2)
    # Compiled in eval() mode, dropout is the identity and the step is the single-device one.
    evaluated = copy.deepcopy(model).eval()
    reference = copy.deepcopy(evaluated)
    pm_eval = compile_in_one_process(evaluated, x, mesh={"pp": 2}, microbatches=2)
    torch.testing.assert_close(pm_eval(x), reference(x))
    torch.testing.assert_close(pm_eval.step(x, targets), mse(reference(x), targets))


def test_dropout_eval_after_a_training_compile_is_not_silent():
    torch.manual_seed(0)
    model, x = Dropping(), torch.randn(8, 8)
    reference = copy.deepcopy(model).eval()
    pm = compile_in_one_process(model, x, mesh={"pp": 2}, microbatches=2)
    try:
        pm.eval()
    except partc.PartcError:
        return  # refused: not silent
    torch.testing.assert_close(pm(x), reference(x))


# == 10. batch not divisible by microbatches ======================================================
def test_batch_not_divisible_by_microbatches():
    model, (tokens,) = build("gpt-tiny", batch_size=6)
    with pytest.raises(partc.PartcError, match="the global batch of 6 does not split into 4 microbatches") as caught:
        partc.plan(model, CPU2, tokens, mesh={"pp": 2}, microbatches=4)
    assert "use a microbatch count that divides 6" in assert_located(caught.value, pass_name="stages")
    with pytest.raises(partc.InfeasiblePlanError, match="the global batch of 5 does not split over 2 data-parallel replicas") as caught:
        partc.plan(model, CPU2, tokens[:5], mesh={"dp": 2})
    assert_located(caught.value, pass_name="estimate")
    # a step on a batch other than the planned one is refused before anything is sent
    pm = partc.compile(model, CPU2, tokens, loss_fn=lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten()), mesh={"pp": 2}, microbatches=2)
    odd = tokens[:5]
    with pytest.raises(partc.PartcError, match="a batch of 5 does not split into 2 equal microbatches"):
        pm.step(odd, odd)


# == 11. infeasible memory ========================================================================
def _gpt_on_meta():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50304, block_size=512, n_layer=4, n_head=8, d_model=512))
        tokens = torch.zeros(8, 512, dtype=torch.long)
    return model, tokens, partc.Cluster.preset("h100", devices_per_node=2)


def _named_budget(error: partc.InfeasiblePlanError, pattern: str) -> float:
    return float(re.search(pattern, str(error)).group(1))


PIPELINE_ONLY = {"mesh": {"pp": 2}, "microbatches": 4, "schedule": "gpipe"}


def test_infeasible_memory_names_the_smallest_budget_that_fits():
    model, tokens, h100x2 = _gpt_on_meta()
    # The search, over every layout, names the smallest budget of its closest layout; that budget fits.
    with pytest.raises(partc.InfeasiblePlanError, match=r"no layout of the model fits 0\.05 GiB per device on 2 devices") as caught:
        partc.plan(model, h100x2, tokens, memory_limit=0.05 * GiB)
    assert_located(caught.value, pass_name="search")
    least = _named_budget(caught.value, r"give at least ([\d.]+) GiB per device")
    assert least > 0.05
    assert partc.plan(model, h100x2, tokens, memory_limit=(least + 0.01) * GiB).fits  # rounded up to the printed precision
    # A pinned pipeline names the least memory any cut needs, and the fix.
    with pytest.raises(partc.InfeasiblePlanError, match=r"the best split needs at least [\d.]+ GiB per device \(stage \d\); budget is 0\.20 GiB") as caught:
        partc.plan(model, h100x2, tokens, memory_limit=0.2 * GiB, **PIPELINE_ONLY)
    assert "use more stages or devices with at least" in assert_located(caught.value, pass_name="stages")


def test_the_budget_a_pinned_pipeline_names_fits():
    model, tokens, h100x2 = _gpt_on_meta()
    with pytest.raises(partc.InfeasiblePlanError) as caught:
        partc.plan(model, h100x2, tokens, memory_limit=0.2 * GiB, **PIPELINE_ONLY)
    least = _named_budget(caught.value, r"needs at least ([\d.]+) GiB per device")
    assert partc.plan(model, h100x2, tokens, memory_limit=(least + 0.01) * GiB, **PIPELINE_ONLY).fits


# == 12. solver time limit ========================================================================
def test_solver_time_limit_marks_the_plan_not_proven(monkeypatch):
    real_solve = pulp.LpProblem.solve

    def stopped_at_the_limit(self, solver=None, **kwargs):
        status = real_solve(self, solver, **kwargs)
        self.assignStatus(pulp.LpStatusOptimal, pulp.LpSolutionIntegerFeasible)  # what PuLP reports then
        return status

    monkeypatch.setattr(pulp.LpProblem, "solve", stopped_at_the_limit)
    model, (tokens,) = build("gpt-tiny", batch_size=8)
    plan = partc.plan(model, CPU2, tokens, mesh={"pp": 2}, microbatches=4, schedule="interleaved")
    assert plan.solver_status == "feasible"  # PuLP said "Optimal"; partc does not
    assert "stage solver: feasible" in plan.summary()


# == 13. PuLP's CBC missing =======================================================================
def test_cbc_missing(monkeypatch):
    monkeypatch.setattr(pulp.PULP_CBC_CMD, "available", lambda self: False)
    monkeypatch.setattr(pulp.COIN_CMD, "available", lambda self: False)
    model, (tokens,) = build("gpt-tiny", batch_size=8)
    for mesh, pass_name in (({"pp": 2}, "stages"), ({"tp": 2}, "sharding")):
        with pytest.raises(partc.SolverError, match="CBC solver .*not available") as caught:
            partc.plan(model, CPU2, tokens, mesh=mesh, microbatches=4)
        assert "pulp" in assert_located(caught.value, pass_name=pass_name).split("fix:")[1]


# == 14. dimensions indivisible by the mesh =======================================================
def test_dimensions_indivisible_by_the_mesh():
    # 12 heads and a vocabulary of 50257 over 8 ranks: neither divides.
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50257, block_size=256, n_layer=2, n_head=12, d_model=768))
        tokens = torch.zeros(2, 256, dtype=torch.long)
    plan = partc.plan(model, partc.Cluster.preset("h100", devices_per_node=8), tokens, mesh={"tp": 8}, mixed_precision="bf16")
    shapes = {name: p.shape for name, p in model.named_parameters()}
    sharded = {name: layout for name, layout in plan.tensor_parallel["parameters"].items() if layout != "R"}
    assert sharded  # the plan still shards what divides
    for name, layout in sharded.items():
        dim = int(re.fullmatch(r"S\((\d)\)", layout).group(1))
        assert shapes[name][dim] % 8 == 0, (name, layout, shapes[name])
    assert plan.sharding.strategies["scaled_dot_product_attention"].name != "head_parallel"
    assert any("size 12, which 8 does not divide" in reason for reason in plan.sharding.refused_views["view"])


# == 15. hard-coded head counts in views ==========================================================
class HardCodedHeads(nn.Module):
    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(32, 32)
        self.out = nn.Linear(32, 32)

    def forward(self, x):
        h = self.qkv(x).view(x.size(0), x.size(1), 4, 8)  # 4 heads, hard-coded
        return self.out(torch.tanh(h).reshape(x.size(0), x.size(1), 32))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = HardCodedHeads(4)

    def forward(self, x):
        return self.attn(x)


def test_hard_coded_head_counts_in_views():
    x = torch.randn(2, 8, 32)
    plan = partc.plan(Attention(), partc.Cluster.preset("h100", devices_per_node=2), x, mesh={"tp": 2})
    view = next(n for n in plan.graph.graph.nodes if n.name == "view")
    # at tp=2 the 4 hard-coded heads become 2 per rank
    layout, rewrites = view_output_layout(view, Shard(2), 2)
    assert layout == Shard(2) and [(r.old, r.new) for r in rewrites] == [(4, 2)]
    # at tp=8 the 4 heads cannot be split: refused with the node, module, source line and fix
    with pytest.raises(partc.UnsupportedOpError, match="cannot shard the input of view on dim 2 over 8 ranks") as caught:
        view_output_layout(view, Shard(2), 8)
    assert_located(caught.value, pass_name="sharding", module="attn", node="view", source="h = self.qkv(x).view(x.size(0), x.size(1), 4, 8)  # 4 heads, hard-coded")
    assert "n_head divisible by the tensor-parallel degree" in caught.value.context.fix


# == 16. ops with no rule =========================================================================
class Rolled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x):
        return torch.roll(self.lin(x), 1, dims=1)


def test_ops_with_no_rule_are_replicated_and_named():
    with pytest.warns(UserWarning, match=r"no sharding rule for roll at node roll") as caught:
        plan = partc.plan(Rolled(), partc.Cluster.preset("h100", devices_per_node=2), torch.randn(2, 16, 64), mesh={"tp": 2})
    warning = next(str(w.message) for w in caught if "roll" in str(w.message))
    assert "test_failure_catalogue.py:" in warning and "torch.roll(self.lin(x), 1, dims=1)" in warning  # the source line
    assert "replicated" in warning
    assert plan.unsupported_ops == ("roll",)
    assert plan.sharding.strategies["roll"].name == "replicate"
    assert "Operators with no rule (1, replicated): roll" in plan.summary()


# == 17. more pipeline ranks than layers ==========================================================
def test_more_pipeline_ranks_than_layers():
    cpu4 = partc.Cluster.preset("cpu", devices_per_node=4)
    with pytest.raises(partc.InfeasiblePlanError, match=r"there are more stages \(4\) than layers \(2\)") as caught:
        partc.plan(Chain(depth=2), cpu4, torch.randn(8, 8), mesh={"pp": 4}, microbatches=4)
    assert "use at most 2 stages" in assert_located(caught.value, pass_name="stages")


# == 18. a stale plan for a changed model =========================================================
def test_stale_plan_for_a_changed_model(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 8)
    options = {"mesh": {"pp": 2}, "microbatches": 4}
    made = partc.plan(Chain(depth=4), CPU2, x, **options)
    path = tmp_path / "plan.json"
    made.to_json(path)
    # the same model binds to the saved plan, with the same hash
    assert partc.planner.replan(Chain(depth=4), x, path, cluster=CPU2, **options).hash == made.hash
    # one more block: refused, saying what differs and what to do
    with pytest.raises(partc.PlanMismatchError, match=r"was not made for this Chain") as caught:
        partc.planner.replan(Chain(depth=5), x, path, cluster=CPU2, **options)
    message = assert_located(caught.value, pass_name="replan")
    assert "graph: the graph's structure" in message and "parameters: parameter names, shapes or dtypes differ" in message
    assert "plan this model again" in caught.value.context.fix


# == 19. a plan file carrying a pickle payload ====================================================
class _Payload:
    def __reduce__(self):
        return (os.system, ("touch should-never-exist",))


def test_plan_file_with_a_pickle_payload_is_refused(tmp_path, monkeypatch):
    import pickle

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "plan.json"
    path.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(partc.PlanMismatchError, match="pickle"):
        partc.Plan.from_json(path)
    with pytest.raises(partc.PlanMismatchError, match="pickle"):
        partc.planner.replan(Chain(), torch.randn(8, 8), path)
    assert not (tmp_path / "should-never-exist").exists()  # nothing was unpickled


# == 20. a rank killed mid-step ===================================================================
@pytest.mark.slow
def test_rank_killed_mid_step_makes_the_others_exit(tmp_path):
    timeout = 6.0  # the process-group timeout the worker sets
    # torchrun's agent stops the other workers once one dies; polling less often than the
    # timeout leaves the survivor to fail on its own, which is what is tested.
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), "--monitor-interval", str(timeout + 1),
        str(DISTRIBUTED / "killed_rank_worker.py"), "--report-dir", str(tmp_path), "--timeout", str(timeout),
    ]
    started = time.monotonic()
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0, "torchrun reported success although rank 1 died"
    report = tmp_path / "survivor.json"
    assert report.exists(), f"the survivor did not fail on its own:\n{result.stderr[-3000:]}"
    survivor = json.loads(report.read_text())
    assert survivor["rank"] == 0 and survivor["error"]  # an exception, not a hang
    assert survivor["seconds"] < timeout + 1, survivor
    assert time.monotonic() - started < 200
