"""`partc calibrate`: the alpha-beta fit, single-process calibration, the CLI's errors, and
a two-process run under torchrun on gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

import partc
from partc import calibrate as cal

ALPHA, BANDWIDTH = 7e-6, 40e9  # 7 us, 40 GB/s
SIZES = [4096 * 4**k for k in range(8)]  # 4 KiB .. 64 MiB


def _synthetic(collective: str, n: int, alpha: float = ALPHA, bandwidth: float = BANDWIDTH):
    a, b = cal._coefficients(collective, n)
    return [(a, b, s, a * alpha + b * s / bandwidth) for s in SIZES]


@pytest.mark.parametrize("collective", ["all_reduce", "all_gather", "reduce_scatter", "p2p"])
@pytest.mark.parametrize("n", [2, 8])
def test_fit_recovers_alpha_beta(collective, n):
    fit = cal._fit_alpha_beta(_synthetic(collective, n))
    assert fit.alpha == pytest.approx(ALPHA, rel=0.01)
    assert fit.bandwidth == pytest.approx(BANDWIDTH, rel=0.01)
    assert fit.residual < 1e-6 and fit.note is None and not fit.degenerate


def test_joint_fit_over_collectives_recovers_alpha_beta():
    points = [p for c in cal.COLLECTIVES for p in _synthetic(c, 4)]
    fit = cal._fit_alpha_beta(points)
    assert fit.alpha == pytest.approx(ALPHA, rel=0.01)
    assert fit.beta == pytest.approx(1 / BANDWIDTH, rel=0.01)
    assert fit.link() == partc.Link(latency=fit.alpha, bandwidth=fit.bandwidth)


def test_fit_ring_coefficients():
    assert cal._coefficients("all_reduce", 4) == (6.0, 1.5)
    assert cal._coefficients("all_gather", 4) == (3.0, 0.75)
    assert cal._coefficients("reduce_scatter", 8) == (7.0, 7 / 8)
    assert cal._coefficients("p2p", 8) == (1.0, 1.0)


def test_fit_clamps_negative_alpha():
    # Times below the bandwidth line at small sizes pull the intercept negative.
    points = [(1.0, 1.0, s, s / BANDWIDTH * (0.5 if s < 20000 else 1.0)) for s in SIZES]
    fit = cal._fit_alpha_beta(points)
    assert fit.alpha == 0.0 and fit.beta > 0 and "clamped" in fit.note


def test_fit_degenerate_falls_back_to_largest_message():
    # Time falls as messages grow: no positive beta fits; bandwidth comes from the largest.
    points = [(2.0, 1.0, s, 1e-3 - 1e-12 * s) for s in SIZES]
    fit = cal._fit_alpha_beta(points)
    assert fit.degenerate and "degenerate" in fit.note
    largest = points[-1]
    assert fit.bandwidth == pytest.approx(largest[2] / largest[3])
    assert fit.alpha >= 0
    single = cal._fit_alpha_beta(points[:1])  # one size cannot separate alpha from beta
    assert single.degenerate and single.beta > 0


def test_fit_without_usable_points_is_a_cluster_error():
    with pytest.raises(partc.ClusterError, match="no usable timings"):
        cal._fit_alpha_beta([(1.0, 1.0, 4096, 0.0)])


def test_single_process_quick(tmp_path, monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "cluster.json"
    cluster = cal.calibrate(str(out), quick=True)
    loaded = partc.Cluster.from_json(out)
    assert loaded == cluster
    assert loaded.world_size == 1 and loaded.num_nodes == 1
    device = loaded.nodes[0].device
    assert device.peak_flops["float32"] > 0 and device.matmul_efficiency == 1.0
    assert device.memory > 0 and device.memory_bandwidth > 0
    # the kernel terms the cost model prices with: measured, in range, and written out
    assert 0 < device.kernel_overhead < 1e-2
    assert set(device.attention_efficiency) == {str(d) for d in cal.ATTENTION_HEAD_DIMS}
    assert all(r > 0 for r in device.attention_efficiency.values())
    assert 0 < device.misaligned_matmul_efficiency <= 1
    printed = capsys.readouterr().out
    assert "kernel overhead" in printed and "attention head dim" in printed and "not a multiple of 16 bytes" in printed
    assert "links not measured" in printed and "float32 TFLOP/s" in printed
    assert list(tmp_path.iterdir()) == [out]  # the atomic write leaves no temporary behind


def test_main_reports_bad_out_without_traceback(tmp_path, monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    missing = tmp_path / "no" / "such" / "cluster.json"
    assert cal.main(["--out", str(missing), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert cal.main(["--out", str(tmp_path), "--quick"]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert not missing.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "cluster.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "partc.calibrate", "--quick", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cluster = partc.Cluster.from_json(out)
    assert cluster.world_size == 2 and cluster.num_nodes == 1 and cluster.nodes[0].devices == 2
    device = cluster.nodes[0].device
    assert device.peak_flops["float32"] > 0 and device.memory > 0 and device.memory_bandwidth > 0
    assert cluster.nodes[0].intra_link.bandwidth > 0 and cluster.nodes[0].intra_link.latency >= 0
    assert cluster.inter_link == cluster.nodes[0].intra_link  # single node: copied
    assert "gloo" in json.loads(out.read_text())["name"]
    assert "single node: inter-node link not measured, copied from intra-node" in proc.stdout
    for collective in ("all_reduce", "all_gather", "p2p"):
        assert f"intra fit {collective}" in proc.stdout


def test_attention_flops_count_as_annotate_does():
    # 2 x (4·BH·L²·E) / 2 causal = 4·BH·L²·E forward ... : 2·2·3·16·16·8 = 12288 forward, x 3.5 with backward
    assert cal.attention_flops(batch_heads=3, tokens=16, head_dim=8) == pytest.approx(3.5 * 2 * 3 * 16 * 16 * 8)
