"""Runtime pieces that need no process group: mesh coordinates, FSDP units, recompute."""

from __future__ import annotations

import copy

import pytest
import torch

import partc
from partc.models import GPT, GPTConfig, training_case
from partc.passes.recompute import CheckpointedLayer, checkpoint_layers
from partc.passes.split_stages import split_stages
from partc.runtime.data_parallel import fsdp_units
from partc.runtime.mesh import coordinates


def test_megatron_rank_order_puts_tensor_parallel_innermost():
    pp, dp, tp = 2, 2, 2
    coords = [coordinates(rank, pp, dp, tp) for rank in range(8)]
    assert coords[:4] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert coords[4] == (1, 0, 0)
    # a tensor-parallel group is consecutive ranks: inside one node of tp devices
    assert {r for r, c in enumerate(coords) if c[:2] == (1, 1)} == {6, 7}


@pytest.mark.parametrize("tied", [False, True])
def test_fsdp_units_are_the_blocks_and_leave_tied_weights_to_the_root(tied):
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=3, n_head=2, d_model=16, tie_weights=tied))
    layers = ["wte", "wpe", "blocks.0", "blocks.1", "blocks.2", "ln_f", "lm_head", ""]
    units = fsdp_units(model, layers)
    assert [u for u in units if u.startswith("blocks.")] == ["blocks.0", "blocks.1", "blocks.2"]
    assert ("wte" in units) == (not tied) and ("lm_head" in units) == (not tied)  # tied: left to the root
    assert "wpe" in units and "ln_f" in units
    assert "" not in units


def test_recompute_keeps_values_gradients_and_state_dict_keys():
    torch.manual_seed(0)
    case = training_case("gpt-tiny", batch_size=2, seq_len=16)
    plan = partc.plan(case.model, partc.Cluster.preset("cpu", devices_per_node=1), case.inputs, mesh={"dp": 1})
    stage = split_stages(plan.graph, [0] * len(plan.layers), case.inputs, persistent_names=set(case.model.state_dict()))[0].module
    keys = sorted(stage.state_dict())
    reference = copy.deepcopy(case.model)
    checkpoint_layers(stage)
    assert sorted(stage.state_dict()) == keys  # the layer bodies hold no tensors
    assert sum(isinstance(m, CheckpointedLayer) for m in stage.modules()) == len(plan.layers)
    assert "self.recompute_layer_" in stage.code

    loss = case.loss_fn(stage(*case.inputs), case.targets)
    loss.backward()
    reference_loss = case.loss_fn(reference(*case.inputs), case.targets)
    reference_loss.backward()
    torch.testing.assert_close(loss, reference_loss)
    params = dict(stage.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(params[name].grad, p.grad, msg=name)


def test_recompute_runs_each_layer_forward_again_in_backward():
    torch.manual_seed(0)
    case = training_case("gpt-tiny", batch_size=2, seq_len=16)
    plan = partc.plan(case.model, partc.Cluster.preset("cpu", devices_per_node=1), case.inputs, mesh={"dp": 1})
    stage = split_stages(plan.graph, [0] * len(plan.layers), case.inputs)[0].module
    checkpoint_layers(stage)
    calls: list[str] = []
    for name, module in stage.named_modules():
        if isinstance(module, CheckpointedLayer):
            module.body.register_forward_pre_hook(lambda m, args, name=name: calls.append(name))
    loss = case.loss_fn(stage(*case.inputs), case.targets)
    forward_calls = list(calls)
    loss.backward()
    recomputed = calls[len(forward_calls):]
    # every layer whose saved tensors backward needs ran again; a layer of parameters'
    # views or sizes alone (nothing saved) need not
    assert forward_calls and set(recomputed) <= set(forward_calls)
    assert any(name.startswith("recompute_layer_") for name in recomputed) and len(recomputed) >= len(plan.layers) // 2
