"""PILoT under DDP and FSDP2 (2 processes, gloo on CPU) against a single process."""
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dist_workers as W

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")


def _spawn(fn, tmp_path, name):
    """Run ``fn`` on 2 ranks; each saves its results as ``{name}{rank}.pt``."""
    mp.spawn(fn, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=W.WORLD, join=True)
    return [torch.load(tmp_path / f"{name}{r}.pt", weights_only=False) for r in range(W.WORLD)]


def test_ddp_matches_single_process_and_ranks_agree(tmp_path):
    ranks = _spawn(W.ddp_worker, tmp_path, "ddp")
    ref = W.single_process_reference()
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)
    assert torch.equal(ranks[0]["l1"], ranks[1]["l1"])
    for a, b in zip(ranks[0]["params"], ref["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ranks[0]["l1"], ref["l1"], rtol=1e-5, atol=1e-5)


def test_ddp_built_after_the_optimizer_keeps_the_broadcast_and_ranks_agree(tmp_path):
    """DDP's broadcast of rank 0's weights is kept (not overwritten by each rank's own
    m·w), and rank 1, splitting the broadcast value, holds rank 0's factors bit for bit."""
    r0, r1 = _spawn(W.ddp_after_optimizer_worker, tmp_path, "ddp_after")
    for a, b, k in zip(r0["broadcast"], r1["broadcast"], r1["kept"]):
        assert torch.equal(a, b) and torch.equal(k, b)
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    for sa, sb in zip(r0["state"], r1["state"]):
        assert sa.keys() == sb.keys()
        for key, v in sa.items():
            assert torch.equal(v, sb[key]) if torch.is_tensor(v) else v == sb[key], key


@pytest.mark.skipif(sys.platform != "linux", reason="FSDP2 on CPU is exercised on Linux")
def test_fsdp2_shards_state_all_reduces_l1_and_round_trips_dcp(tmp_path):
    ranks = _spawn(W.fsdp2_worker, tmp_path, "fsdp")
    ref = W.single_process_reference()
    for r in ranks:
        for a, b in zip(r["params"], ref["params"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # The all-reduced L1 is the whole model's, on every rank.
        torch.testing.assert_close(r["l1"], ref["l1"], rtol=1e-5, atol=1e-5)
        assert r["resumed_equal"]
        assert r["zeros"] == ref["zeros"] and sum(ref["zeros"].values()) > 0
        torch.testing.assert_close(*r["l1_resumed"])
    assert torch.equal(ranks[0]["l1"], ranks[1]["l1"])
    assert torch.equal(ranks[0]["m_full"], ranks[1]["m_full"])


@pytest.mark.skipif(sys.platform != "linux", reason="FSDP2 on CPU is exercised on Linux")
def test_target_sparsity_agrees_across_ranks_under_ddp_and_fsdp2(tmp_path):
    """Replicated (DDP): both ranks measure the same share and take the same decisions.
    Sharded (FSDP2): one all-reduce of the histogram gives every rank the share a single
    process computes over the whole tensors, so α moves identically everywhere."""
    from pilot_kernels.schedules import SHARE_REL_ERROR

    ranks = _spawn(W.target_sparsity_worker, tmp_path, "target")
    ref = W.target_sparsity_reference()
    assert ranks[0]["fsdp_local_numel"] == 4 * 6  # uneven shards: rank 0 holds 4 of 7 rows
    for mode in ("ddp", "fsdp"):
        r0, r1 = ranks[0][mode], ranks[1][mode]
        assert torch.equal(r0["shares"], r1["shares"]), mode
        assert r0["state"] == r1["state"] and r0["alphas"] == r1["alphas"], mode
        torch.testing.assert_close(r0["shares"], ref["shares"], rtol=1e-5, atol=0.0)
        assert r0["state"]["last_action"] == ref["state"]["last_action"]
        assert r0["alphas"] == pytest.approx(ref["alphas"], rel=1e-12), mode
    # And the single-process value is the whole model's share (not one shard's).
    a = torch.cat([w.abs().double().flatten() for w in ref["weights"]]).sort().values
    exact = (a[: round(W.TARGET["target"] * a.numel())].sum() / a.sum()).item()
    assert abs(ref["shares"][-1].item() - exact) <= SHARE_REL_ERROR * exact
    assert ref["alphas"] != [W.HPARAMS["alpha"]]  # the controller moved α
