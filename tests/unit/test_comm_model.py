"""The alpha-beta projection of app/bench/comm_model.py against numbers worked out by hand, and
the bytes it assumes against what the traffic counters count at P = 2."""
import argparse

import pytest

from app.bench import comm, comm_model
from app.bench.comm_model import Network

NET = Network.of(bandwidth_gbps=100, latency_us=5)  # alpha 5e-6 s, beta 8e-11 s/byte
UNIT = Network(alpha=1.0, beta=1.0)


def test_network_from_bandwidth_and_latency():
    assert NET.alpha == pytest.approx(5e-6) and NET.beta == pytest.approx(8e-11)


def test_collectives_by_hand():
    # 14 alpha + 2 * 7/8 * 1e6 beta = 7e-5 + 1.4e-4
    assert comm_model.allreduce_s(NET, 8, 1e6) == pytest.approx(2.1e-4)
    # 3 alpha + 3 * 1000 beta
    assert comm_model.allgather_s(NET, 4, 1000) == pytest.approx(1.524e-5)
    # 3 alpha + 3/4 * 4000 beta
    assert comm_model.reduce_scatter_s(NET, 4, 4000) == pytest.approx(1.524e-5)


def test_sparse_gradients_by_hand():
    # three allgathers: 21 alpha, and 7 * 1e4 pair bytes: 1.05e-4 + 5.6e-6
    assert comm_model.sparse_gradients_s(NET, 8, 1e4, 0) == pytest.approx(1.106e-4)
    # plus the small tensors' allreduce of 800 bytes: 14 alpha + 1.75 * 800 beta
    assert comm_model.sparse_gradients_s(NET, 8, 1e4, 800) == pytest.approx(1.80712e-4)
    # dense: 2 (P-1) alpha + 2 (P-1)/P G beta
    assert comm_model.dense_gradients_s(NET, 8, 1e6) == pytest.approx(2.1e-4)


def test_classifier_batchnorm_and_step_with_unit_alpha_and_beta():
    # P = 2, b = 2, D = 3: one message per allgather / reduce-scatter, two per allreduce.
    assert comm_model.classifier_s(UNIT, 2, 2, 3) == {
        "other": 1 + 8, "labels": 1 + 16, "features": 1 + 24,
        "logits": (2 + 16) + (2 + 32), "feature_gradients": 1 + 24}
    # C = 2: allgather of 4 * 5 bytes, allreduce of 16 bytes.
    assert comm_model.batchnorm_s(UNIT, 2, [2]) == (1 + 20) + (2 + 16)
    dense = comm_model.step_s(UNIT, 2, compute_s=0.5, batch=2, dim=3, grad_bytes=100,
                              bn_channels=(2,))
    assert dense["backbone_gradients"] == 2 + 100
    assert dense["total"] == 0.5 + 9 + 17 + 25 + 52 + 25 + 39 + 102
    sparse = comm_model.step_s(UNIT, 2, compute_s=0.5, batch=2, dim=3, grad_bytes=100,
                               pair_bytes=10, small_bytes=4)
    assert sparse["backbone_gradients"] == 3 + 10 + (2 + 4)


def test_bytes_at_two_ranks_are_what_the_counters_count():
    # With alpha 0 and beta 1 a term is the bytes one rank sends; the integration test of the
    # metrics contract measures these at P = 2, b = 24, D = 16 (test_metrics_contract.py).
    bytes_only = Network(alpha=0.0, beta=1.0)
    by_kind = comm_model.classifier_s(bytes_only, 2, 24, 16)
    assert by_kind["features"] == 24 * 16 * 4 and by_kind["labels"] == 24 * 8
    assert by_kind["feature_gradients"] == 48 * 16 * 4 // 2
    assert by_kind["logits"] == 2 * (48 * 4 + 48 * 2 * 4) // 2


def test_sparse_variants_set_the_ratio_and_momentum_correction():
    parser = argparse.ArgumentParser()
    comm.arguments(parser)
    args = parser.parse_args(["--ratio", "0.05", "--warmup", "3"])
    assert comm.variant_sets(args, "dense") == ["comm.gradients=dense"]
    assert comm.variant_sets(args, "sparse_mc") == [
        "comm.gradients=sparse", "comm.sparse_ratio=0.05", "comm.sparse_warmup_steps=3",
        "comm.momentum_correction=true"]


def test_projection_takes_pair_bytes_and_compute_from_the_two_rank_runs():
    parser = argparse.ArgumentParser()
    comm.arguments(parser)
    args = parser.parse_args(["--bandwidth-gbps", "10", "--latency-us", "2"])
    sizes = comm.backbone_sizes(args)
    small = sizes["small_bytes"]
    runs = [{"ranks": 2, "variant": "dense", "grad_bytes_sent": sizes["grad_bytes"],
             "median_step_s": 0.5, "median_comm_s": 0.1},
            {"ranks": 2, "variant": "sparse", "grad_bytes_sent": 1000 + small,
             "median_step_s": 0.3, "median_comm_s": 0.05},
            {"ranks": 4, "variant": "dense", "grad_bytes_sent": 1, "median_step_s": 9,
             "median_comm_s": 0}]
    out = comm.projection(args, runs, batch=64)
    assert out["from_ranks"] == 2 and out["compute_s"] == pytest.approx(0.4)
    assert out["variants"]["sparse"]["pair_bytes"] == pytest.approx(1000)
    net = Network.of(10, 2)
    want = comm_model.step_s(net, 16, compute_s=0.4, batch=64, dim=sizes["dim"],
                             grad_bytes=sizes["grad_bytes"], pair_bytes=1000, small_bytes=small,
                             bn_channels=tuple(sizes["bn_channels"]))
    assert out["variants"]["sparse"]["step_s"]["10.0"]["16"] == pytest.approx(want)
