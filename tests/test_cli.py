"""The partc command: plan, graph, models, user factories and errors."""

import json
import subprocess
import sys
import textwrap

import pytest

from partc.cli import main


def test_plan_builtin_model_writes_json_and_dot(tmp_path, capsys):
    plan_path, dot_path = tmp_path / "plan.json", tmp_path / "graph.dot"
    code = main(["plan", "gpt-tiny", "--cluster", "cpu:1x2", "--dtype", "fp32", "--batch", "4", "--json", str(plan_path), "--dot", str(dot_path)])
    out = capsys.readouterr()
    assert code == 0
    assert "partc plan: GPT on 1 node(s) x 2 CPU" in out.out and "Predicted step time" in out.out
    assert "[partc] capture" in out.err  # progress goes to stderr
    data = json.loads(plan_path.read_text())
    assert data["format"] == "partc.plan" and data["mesh"] == {"pp": 1, "dp": 2, "tp": 1} and data["batch_size"] == 4
    assert dot_path.read_text().startswith("digraph partc {")


def test_plan_user_factory(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent(
            """
            import torch
            def make():
                model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
                return model, (torch.randn(16, 32),)
            def not_a_pair():
                return 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["plan", "my_models:make", "--cluster", "h100x4"]) == 0
    out = capsys.readouterr().out
    assert "Sequential" in out and "Chosen by the search over" in out  # no mesh pinned: searched
    assert main(["plan", "my_models:not_a_pair"]) == 2
    assert "must return (model, example_inputs)" in capsys.readouterr().err
    assert main(["plan", "my_models:absent"]) == 2
    assert "has no callable 'absent'" in capsys.readouterr().err


def test_plan_writes_each_pipeline_rank_code(tmp_path, capsys):
    assert main(["plan", "gpt-tiny", "--cluster", "cpu:1x2", "--mesh", "pp=2", "--source", str(tmp_path / "code")]) == 0
    rank0, rank1 = ((tmp_path / "code" / f"rank_{r}.py").read_text() for r in (0, 1))
    assert "stage 0 of 2" in rank0 and "def forward(self, idx)" in rank0
    assert "stage 1 of 2" in rank1 and "sends output" in rank1


def test_graph_prints_layers_and_sources(capsys):
    assert main(["graph", "llama-tiny", "--batch", "2", "--seq", "16"]) == 0
    out = capsys.readouterr().out
    assert "## layer 1: tok_embeddings" in out and "## layer 2: layers.0" in out
    assert "scaled_dot_product_attention" in out and "llama.py:" in out


def test_models_lists_builtins(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("gpt2", "gpt3-175b", "llama-70b", "hf-tiny"):
        assert name in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "no-such-model"], "unknown model 'no-such-model'"),
        (["plan", "gpt-tiny", "--cluster", "tpu9000"], "cannot read cluster 'tpu9000'"),
        (["plan", "no_such_module_xyz:make"], "cannot import 'no_such_module_xyz'"),
    ],
)
def test_errors_are_one_message_not_a_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("partc: error: ") and message in err and "Traceback" not in err


def test_console_script_default_plans_gpt2_on_h100x8():
    """`partc plan` with no arguments: the README's first command."""
    result = subprocess.run([sys.executable, "-m", "partc.cli", "plan"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "partc plan: GPT on 1 node(s) x 8 H100-SXM-80GB" in result.stdout
    assert "blocks.0 .. blocks.11 (x12)" in result.stdout and "Peak memory / device" in result.stdout
