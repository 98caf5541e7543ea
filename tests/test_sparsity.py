"""Tests for pilot_kernels.sparsity: measuring, pruning and exporting (paper §4, appendix C.2)."""
import copy
import math

import pytest
import torch
from torch import nn

from pilot_kernels import PILoT
from pilot_kernels.sparsity import (
    apply_keep_masks_,
    SparsityReport,
    export_state_dict,
    prune_,
    sparsity_report,
    spred_sparsities,
    sweep,
)
from pilot_kernels.sparsity import SHARE_REL_ERROR, prunable_share

# ---------------------------------------------------------------------- fixtures
W0 = [[0.0, -1.0, 2.0], [0.5, -0.0, 3.0]]  # |x| = 0, 1, 2, 0.5, 0, 3
W1 = [[5.0, -6.0], [7.0, 0.1]]  # |x| = 5, 6, 7, 0.1


def handcrafted():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(W0))
        model[1].weight.copy_(torch.tensor(W1))
        model[0].bias.fill_(0.0)  # biases (ndim 1) are never counted or pruned
        model[1].bias.fill_(0.0)
    return model


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    )


def trained(seed=0, steps=3, dtype=torch.float32, **opt_kwargs):
    """A small net after a few PILoT steps with momentum, so every state buffer exists."""
    model = small_net(seed).to(dtype)
    kwargs = dict(lr=0.05, momentum=0.9, alpha=1e-3, weight_decay=1e-3)
    kwargs.update(opt_kwargs)
    opt = PILoT(model.parameters(), **kwargs)
    for _ in range(steps):
        train_step(model, opt)
    return model, opt


def train_step(model, opt):
    x = torch.randn(8, 3, 6, 6, dtype=next(model.parameters()).dtype)
    y = torch.randint(0, 5, (8,))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x).float(), y).backward()
    opt.step()


def targets(model, opt=None):
    if opt is None:
        return {n: p for n, p in model.named_parameters() if p.ndim >= 2}
    return {n: p for n, p in model.named_parameters() if "m" in opt.state.get(p, {})}


def snapshot(model, opt=None):
    """Deep copy of every parameter, buffer and optimizer state tensor."""
    snap = {"model": {k: v.clone() for k, v in model.state_dict().items()}}
    if opt is not None:
        snap["state"] = {
            id(p): {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
            for g in opt.param_groups
            for p in g["params"]
        }
        snap["l1"] = opt.l1_norm().clone()
    return snap


def assert_same(snap, model, opt=None):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap["model"][k]), k
    if opt is not None:
        for g in opt.param_groups:
            for p in g["params"]:
                saved = snap["state"][id(p)]
                now = {k: v for k, v in opt.state[p].items() if torch.is_tensor(v)}
                assert saved.keys() == now.keys()
                for k in saved:
                    assert torch.equal(saved[k], now[k]), k
        assert torch.equal(opt.l1_norm(), snap["l1"])


# ---------------------------------------------------------------------- report
def test_report_exact_counts_on_handcrafted_tensors():
    model = handcrafted()
    r = sparsity_report(model)
    assert isinstance(r, SparsityReport)
    assert list(r.layer_numel) == ["0.weight", "1.weight"]  # biases excluded
    assert r.layer_zeros == {"0.weight": 2, "1.weight": 0}  # -0.0 counts as zero
    assert r.layer_numel == {"0.weight": 6, "1.weight": 4}
    assert r.layer_sparsity == {"0.weight": 2 / 6, "1.weight": 0.0}
    assert (r.zeros, r.numel, r.sparsity) == (2, 10, 0.2)

    r = sparsity_report(model, threshold=0.5)
    assert r.layer_zeros == {"0.weight": 3, "1.weight": 1}
    assert r.sparsity == 0.4
    r = sparsity_report(model, threshold=1.0)
    assert r.layer_zeros == {"0.weight": 4, "1.weight": 1}


def test_report_format_is_a_table():
    text = str(sparsity_report(handcrafted(), threshold=0.5))
    assert text == sparsity_report(handcrafted(), threshold=0.5).format()
    lines = text.splitlines()
    assert lines[0].split() == ["tensor", "numel", "zeros", "sparsity"]
    assert lines[1].split() == ["0.weight", "6", "3", "50.00%"]
    assert lines[2].split() == ["1.weight", "4", "1", "25.00%"]
    assert lines[4].split() == ["global", "10", "4", "40.00%"]
    assert "0.5" in lines[-1]


def test_report_with_optimizer_counts_reparameterized_tensors_only():
    model, opt = trained()
    r = sparsity_report(model, opt)
    assert set(r.layer_numel) == {"0.weight", "4.weight"}
    # reparam=False groups are not counted
    model2 = small_net()
    opt2 = PILoT(
        [{"params": [model2[0].weight], "reparam": False}, {"params": [model2[4].weight]}], lr=0.1
    )
    assert set(sparsity_report(model2, opt2).layer_numel) == {"4.weight"}


# ---------------------------------------------------------------------- prune (handcrafted)
def flat(mask):
    return mask.flatten().tolist()


def test_prune_global_exact():
    model = handcrafted()
    keep = prune_(model, sparsity=0.5, scope="global")  # 5 of 10: |x| 0, 0, 0.1, 0.5, 1
    assert flat(keep["0.weight"]) == [False, False, True, False, False, True]
    assert flat(keep["1.weight"]) == [True, True, True, False]
    assert model[0].weight.flatten().tolist() == [0.0, 0.0, 2.0, 0.0, 0.0, 3.0]
    assert model[1].weight.flatten().tolist() == [5.0, -6.0, 7.0, 0.0]
    assert model[0].bias.tolist() == [0.0, 0.0]
    assert sparsity_report(model).zeros == 5


def test_prune_layer_exact():
    model = handcrafted()
    keep = prune_(model, sparsity=0.5, scope="layer")  # 3 of 6 and 2 of 4
    assert flat(keep["0.weight"]) == [False, True, True, False, False, True]
    assert flat(keep["1.weight"]) == [False, True, True, False]
    assert model[1].weight.flatten().tolist() == [0.0, -6.0, 7.0, 0.0]
    r = sparsity_report(model)
    assert r.layer_zeros == {"0.weight": 3, "1.weight": 2}


def test_prune_ties_are_exact_and_deterministic():
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 2, bias=False))
    nn.init.constant_(model[0].weight, 1.0)
    nn.init.constant_(model[1].weight, 1.0)
    keep = prune_(model, sparsity=0.5)  # 6 of 12 equal magnitudes: earliest positions first
    assert flat(keep["0.weight"]) == [False] * 6 + [True] * 2
    assert flat(keep["1.weight"]) == [True] * 4
    model2 = nn.Linear(4, 2, bias=False)
    nn.init.constant_(model2.weight, -2.0)
    keep = prune_(nn.Sequential(model2), sparsity=0.3)  # round(0.3 · 8) = 2
    assert flat(keep["0.weight"]) == [False, False] + [True] * 6


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("s", [0.0, 0.1, 0.37, 0.5, 0.9, 0.99, 1.0])
def test_prune_count_is_round_s_n(s, scope):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(13, 7), nn.Linear(7, 5), nn.Linear(5, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.randint(-2, 3, (5, 7)).float())  # many ties incl. zeros
    original = {n: p.detach().abs().clone() for n, p in targets(model).items()}
    keep = prune_(model, sparsity=s, scope=scope)
    sizes = {n: p.numel() for n, p in targets(model).items()}
    pruned = {n: int((~k).sum()) for n, k in keep.items()}
    if scope == "global":
        assert sum(pruned.values()) == round(s * sum(sizes.values()))
        groups = [list(keep)]
    else:
        assert pruned == {n: round(s * size) for n, size in sizes.items()}
        groups = [[n] for n in keep]
    for n, p in targets(model).items():
        assert keep[n].dtype == torch.bool and keep[n].shape == p.shape
        assert torch.all(p[~keep[n]] == 0)
        assert torch.equal(p[keep[n]].abs(), original[n][keep[n]])
    for names in groups:  # within one ranking, nothing kept is smaller than anything pruned
        kept = torch.cat([original[n][keep[n]] for n in names])
        dropped = torch.cat([original[n][~keep[n]] for n in names])
        if kept.numel() and dropped.numel():
            assert dropped.max() <= kept.min()


def test_global_prune_removes_the_smallest_magnitudes():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
    with torch.no_grad():
        model[1].weight.mul_(10)  # the second layer is much larger: global prunes mostly layer 0
    original = {n: p.detach().clone() for n, p in targets(model).items()}
    keep = prune_(model, sparsity=0.4)
    kept = torch.cat([original[n][keep[n]].abs() for n in keep])
    dropped = torch.cat([original[n][~keep[n]].abs() for n in keep])
    assert dropped.max() <= kept.min()
    assert (~keep["0.weight"]).sum() > (~keep["1.weight"]).sum()


# ---------------------------------------------------------------------- prune with PILoT
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prune_keeps_x_m_w_and_momentum_consistent(scope):
    model, opt = trained()
    before = snapshot(model, opt)
    keep = prune_(model, opt, sparsity=0.7, scope=scope)
    n = sum(p.numel() for p in targets(model, opt).values())
    assert sum(int((~k).sum()) for k in keep.values()) == (
        round(0.7 * n) if scope == "global" else sum(round(0.7 * p.numel()) for p in targets(model, opt).values())
    )
    for name, p in targets(model, opt).items():
        state, old = opt.state[p], before["state"][id(p)]
        k = keep[name]
        assert torch.equal(p, (state["m"] * state["w"]).to(p.dtype))
        for key in ("m", "w", "momentum_m", "momentum_w"):
            assert torch.all(state[key][~k] == 0), key
            assert torch.equal(state[key][k], old[key][k]), key
        assert torch.all(p[~k] == 0) and torch.equal(p[k], before["model"][name][k])
    # tensors that are not reparameterized are untouched, their momentum too
    for name in ("0.bias", "1.weight", "1.bias", "4.bias"):
        assert torch.equal(model.state_dict()[name], before["model"][name])
    # l1_norm is refreshed to the pruned weights
    l1 = sum(p.abs().sum() for p in targets(model, opt).values())
    torch.testing.assert_close(opt.l1_norm(), l1)


def test_apply_keep_masks_reapplies_pruning_after_a_rewind():
    """Rewinding restores the pruned entries; re-applying the masks zeroes them again
    in x, m, w and both momenta, and refreshes the L1 norm."""
    model, opt = trained()
    before = snapshot(model, opt)
    keep = prune_(model, opt, sparsity=0.6)
    with torch.no_grad():  # rewind everything to the unpruned values
        for name, p in targets(model, opt).items():
            p.copy_(before["model"][name])
            for key, v in before["state"][id(p)].items():
                if isinstance(v, torch.Tensor):
                    opt.state[p][key].copy_(v)
    assert any(torch.any(p[~keep[n]] != 0) for n, p in targets(model, opt).items())
    apply_keep_masks_(model, opt, keep)
    for name, p in targets(model, opt).items():
        k = keep[name]
        assert torch.all(p[~k] == 0) and torch.equal(p[k], before["model"][name][k])
        for key in ("m", "w", "momentum_m", "momentum_w"):
            assert torch.all(opt.state[p][key][~k] == 0), key
    l1 = sum(p.abs().sum() for p in targets(model, opt).values())
    torch.testing.assert_close(opt.l1_norm(), l1)


@pytest.mark.parametrize(
    "dtype, opt_kwargs",
    [
        (torch.float32, dict(momentum=0.9)),
        (torch.float32, dict(momentum=0.9, nesterov=True)),
        (torch.float32, dict(momentum=0.5, dampening=0.3, maximize=True)),
        (torch.bfloat16, dict(momentum=0.9)),
    ],
)
def test_pruned_entries_stay_exactly_zero_through_pilot_steps(dtype, opt_kwargs):
    model, opt = trained(dtype=dtype, alpha=5e-2, weight_decay=1e-2, **opt_kwargs)
    keep = prune_(model, opt, sparsity=0.6)
    kept_before = {n: p.detach().clone() for n, p in targets(model, opt).items()}
    for _ in range(5):
        train_step(model, opt)
    for name, p in targets(model, opt).items():
        state, k = opt.state[p], keep[name]
        assert torch.all(p[~k] == 0), name
        for key in ("m", "w", "momentum_m", "momentum_w"):
            assert torch.all(state[key][~k] == 0), (name, key)
        assert not torch.equal(p[k], kept_before[name][k])  # the rest did train
        assert torch.equal(p, (state["m"] * state["w"]).to(dtype))


def test_prune_before_first_step_stays_zero():
    """Pruned before momentum buffers exist: the first step creates them as d = 0 there."""
    model = small_net()
    opt = PILoT(model.parameters(), lr=0.05, momentum=0.9, alpha=1e-2, weight_decay=1e-2)
    keep = prune_(model, opt, sparsity=0.5, scope="layer")
    for _ in range(3):
        train_step(model, opt)
    for name, p in targets(model, opt).items():
        assert torch.all(p[~keep[name]] == 0)


def test_without_optimizer_prunes_only_x():
    model, opt = trained()
    before = snapshot(model, opt)
    keep = prune_(model, sparsity=0.5)  # no optimizer: ndim >= 2 tensors, x only
    assert set(keep) == {"0.weight", "4.weight"}
    p = model[0].weight
    assert torch.all(p[~keep["0.weight"]] == 0)
    assert torch.equal(opt.state[p]["m"], before["state"][id(p)]["m"])


# ---------------------------------------------------------------------- sweep
def test_sweep_restores_everything_bit_exactly():
    model, opt = trained()
    model.eval()
    before = snapshot(model, opt)
    n = sum(p.numel() for p in targets(model, opt).values())
    x = torch.randn(4, 3, 6, 6)
    seen = []

    def evaluate():
        seen.append(sparsity_report(model, opt).zeros)
        with torch.no_grad():
            return model(x).sum().item()

    sparsities = spred_sparsities(range(0, 4))
    results = sweep(model, opt, evaluate, sparsities)
    assert [r[0] for r in results] == sparsities
    assert [r[1] for r in results] == [round(s * n) / n for s in sparsities]
    assert seen == [round(s * n) for s in sparsities]  # fn saw the pruned model
    assert results[0][2] != results[-1][2]
    assert_same(before, model, opt)
    # and training continues exactly as without the sweep
    twin_model = copy.deepcopy(model)
    twin_opt = PILoT(twin_model.parameters(), lr=0.05)
    # deepcopy: Optimizer.load_state_dict keeps SGD's momentum_buffer tensors by reference
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    torch.manual_seed(5)
    train_step(model, opt)
    torch.manual_seed(5)
    train_step(twin_model, twin_opt)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)


def test_sweep_restores_when_fn_raises():
    model, opt = trained()
    before = snapshot(model, opt)
    calls = []

    def boom():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("evaluation failed")
        return "ok"

    with pytest.raises(RuntimeError, match="evaluation failed"):
        sweep(model, opt, boom, [0.5, 0.9, 0.99])
    assert len(calls) == 2
    assert_same(before, model, opt)


def test_sweep_validates_everything_before_pruning():
    model, opt = trained()
    before = snapshot(model, opt)
    calls = []
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sweep(model, opt, lambda: calls.append(1), [0.5, 0.9, 1.5])
    with pytest.raises(ValueError, match="scope"):
        sweep(model, opt, lambda: calls.append(1), [0.5], scope="row")
    assert calls == []
    assert_same(before, model, opt)


def test_spred_sparsities():
    s = spred_sparsities()
    assert s == [1 - 10.0**-c for c in range(7)]
    assert s[0] == 0.0 and s[1] == pytest.approx(0.9) and s[-1] == pytest.approx(0.999999)
    assert spred_sparsities([2]) == [pytest.approx(0.99)]
    with pytest.raises(ValueError, match=">= 0"):
        spred_sparsities([1, -1])


# ---------------------------------------------------------------------- export
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_export_loads_strictly_and_has_the_reported_sparsity(scope):
    model, opt = trained()
    before = snapshot(model, opt)
    sd = export_state_dict(model, opt, sparsity=0.8, scope=scope)
    assert_same(before, model, opt)  # the model itself is not modified
    assert list(sd) == list(model.state_dict())
    assert all(v.device.type == "cpu" for v in sd.values())

    fresh = small_net(seed=123)
    fresh.load_state_dict(sd, strict=True)
    pruned_model = copy.deepcopy(model)
    pruned_opt = PILoT(pruned_model.parameters(), lr=0.05)
    pruned_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    prune_(pruned_model, pruned_opt, sparsity=0.8, scope=scope)
    for k, v in pruned_model.state_dict().items():
        assert torch.equal(sd[k], v), k  # the same entries as prune_ would zero
    r_fresh = sparsity_report(fresh)
    n = r_fresh.numel
    if scope == "global":
        assert r_fresh.zeros == round(0.8 * n)
    assert r_fresh.sparsity == sparsity_report(pruned_model, pruned_opt).sparsity

    # copies: writing into the export does not reach the model
    sd["4.weight"].fill_(7.0)
    assert not torch.equal(model[4].weight.detach(), sd["4.weight"])


def test_export_threshold_and_plain_copy():
    model = handcrafted()
    sd = export_state_dict(model, threshold=1.0)
    assert sd["0.weight"].flatten().tolist() == [0.0, 0.0, 2.0, 0.0, 0.0, 3.0]
    assert sd["1.weight"].flatten().tolist() == [5.0, -6.0, 7.0, 0.0]
    assert model[0].weight[0, 1].item() == -1.0  # unchanged
    plain = export_state_dict(model)
    for k, v in model.state_dict().items():
        assert torch.equal(plain[k], v) and plain[k].data_ptr() != v.data_ptr()
    fresh = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    fresh.load_state_dict(sd, strict=True)
    assert sparsity_report(fresh).zeros == 5


def test_export_zeroes_tied_weights_under_every_key():
    lin = nn.Linear(4, 4, bias=False)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(16.0).view(4, 4) - 7.5)
    sd = export_state_dict(model, sparsity=0.25)
    assert set(sd) == {"0.weight", "2.weight"}
    assert torch.equal(sd["0.weight"], sd["2.weight"])
    assert int((sd["0.weight"] == 0).sum()) == 4
    model2 = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 4, bias=False))
    model2.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------- bad input
BAD_SPARSITIES = [-0.1, 1.1, float("nan"), True, "0.5", None]


@pytest.mark.parametrize("bad", BAD_SPARSITIES)
def test_bad_sparsity_raises_and_changes_nothing(bad):
    model, opt = trained()
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prune_(model, opt, sparsity=bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sweep(model, opt, lambda: None, [bad])
    if bad is not None:
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            export_state_dict(model, opt, sparsity=bad)
    assert_same(before, model, opt)


def test_bad_scope_raises_and_changes_nothing():
    model, opt = trained()
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="'global'.*'layer'"):
        prune_(model, opt, sparsity=0.5, scope="channel")
    with pytest.raises(ValueError, match="scope"):
        export_state_dict(model, opt, sparsity=0.5, scope="channel")
    assert_same(before, model, opt)


def test_foreign_optimizer_raises_and_changes_nothing():
    model, opt = trained()
    other = copy.deepcopy(model)
    other_opt = PILoT(other.parameters(), lr=0.1)
    before = snapshot(model, opt)
    for fn in (
        lambda: prune_(model, other_opt, sparsity=0.5),
        lambda: sparsity_report(model, other_opt),
        lambda: export_state_dict(model, other_opt, sparsity=0.5),
        lambda: sweep(model, other_opt, lambda: None, [0.5]),
    ):
        with pytest.raises(ValueError, match="none of the model's parameters"):
            fn()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="reparameterizes none"):
        prune_(model, sgd, sparsity=0.5)
    assert_same(before, model, opt)


def test_other_bad_inputs():
    model = handcrafted()
    before = snapshot(model)
    with pytest.raises(ValueError, match="not both"):
        export_state_dict(model, sparsity=0.5, threshold=0.1)
    with pytest.raises(ValueError, match="threshold"):
        export_state_dict(model, threshold=-1.0)
    with pytest.raises(ValueError, match="threshold"):
        sparsity_report(model, threshold=-1.0)
    with pytest.raises(ValueError, match="ndim >= 2"):
        prune_(nn.Sequential(nn.BatchNorm1d(3)), sparsity=0.5)
    with pytest.raises(TypeError, match="nn.Module"):
        prune_(list(model.parameters()), sparsity=0.5)
    assert_same(before, model)


# ---------------------------------------------------------------------- prunable_share
def brute_share(tensors, target, power=1):
    """The definition, by a full sort in float64."""
    a = torch.cat([t.detach().abs().double().flatten() for t in tensors]).sort().values ** power
    k = round(target * a.numel())
    return (a[:k].sum() / a.sum()).item() if a.sum() > 0 else 0.0


def odd_tensors(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 3), (1,), (13,), (5, 1, 3)]
    # Different scales per tensor: the global ranking must mix them.
    return [torch.randn(s, generator=g) * 10.0 ** (2 * torch.rand(1, generator=g).item() - 1) for s in shapes]


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("target", [0.01, 0.3, 0.5, 0.9, 0.97, 0.999])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_share_matches_a_brute_force_sort_within_the_documented_bound(seed, target, power):
    ts = odd_tensors(seed)
    exact = brute_share(ts, target, power)
    got = prunable_share(ts, target, power)
    assert got.dtype == torch.float64 and got.dim() == 0
    bound = ((1 + SHARE_REL_ERROR) ** power - 1) * exact
    assert abs(got.item() - exact) <= bound + 1e-15, (got.item(), exact)


def test_share_is_exact_when_the_threshold_bin_holds_equal_values():
    """Powers of two with ties (and zeros): every bin holds one value, so the within-bin
    estimate is exact; odd total size 37."""
    g = torch.Generator().manual_seed(3)
    exps = torch.randint(-20, 5, (37,), generator=g).double()
    x = (2.0 ** exps) * torch.where(torch.rand(37, generator=g) < 0.5, -1.0, 1.0)
    x[::9] = 0.0
    x = x.float()
    for target in (0.1, 0.35, 0.5, 0.9, 0.95):
        assert prunable_share(x, target).item() == pytest.approx(brute_share([x], target), rel=1e-12, abs=1e-15)
        assert prunable_share([x[:11], x[11:]], target).item() == pytest.approx(brute_share([x], target), rel=1e-12)


def test_share_is_scale_and_size_free():
    x = odd_tensors(4)
    base = prunable_share(x, 0.9)
    # Scaling by a power of two shifts every entry by whole bins: the very same value.
    assert torch.equal(prunable_share([t * 2.0**12 for t in x], 0.9), base)
    assert torch.equal(prunable_share([t * 2.0**-30 for t in x], 0.9), base)
    # Scaling by another factor moves entries within bins: equal up to the bound.
    assert prunable_share([t * 37.3 for t in x], 0.9).item() == pytest.approx(base.item(), rel=2 * SHARE_REL_ERROR)
    # Four copies of the model: the same distribution, the same share (an L1 threshold K
    # would have to be four times larger).
    assert prunable_share(x * 4, 0.9).item() == pytest.approx(base.item(), rel=1e-12)


def test_share_edge_values():
    assert prunable_share(torch.zeros(5, 3), 0.9).item() == 0.0  # nothing to prune away
    assert prunable_share(torch.ones(10), 0.9).item() == pytest.approx(0.9, rel=1e-12)
    assert prunable_share(torch.ones(3), 0.1).item() == 0.0  # round(0.3) = 0 entries
    assert prunable_share(torch.tensor([1e-30, 5e-25, 3e30]), 0.5).item() == pytest.approx(1e-30 / 3e30, rel=1e-6)
    for bad in (math.nan, math.inf):
        x = torch.randn(9)
        x[4] = bad
        assert math.isnan(prunable_share(x, 0.5).item())
    half = torch.randn(11).to(torch.bfloat16)
    assert prunable_share(half, 0.5).item() == pytest.approx(brute_share([half], 0.5), rel=SHARE_REL_ERROR)


def test_share_of_an_optimizer_reads_its_reparameterized_tensors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    opt = PILoT(model.parameters(), lr=0.1, alpha=1e-3)
    weights = [model[0].weight, model[2].weight]  # not the biases
    assert prunable_share(opt, 0.8).item() == pytest.approx(brute_share(weights, 0.8), rel=SHARE_REL_ERROR)
    with torch.no_grad():
        model[0].weight.mul_(0.0)  # the parameters are the truth
    assert prunable_share(opt, 0.8).item() == pytest.approx(brute_share(weights, 0.8), rel=SHARE_REL_ERROR)


@pytest.mark.parametrize("target", [0, 1, 1.5, -0.1, math.nan, True, "0.9", None])
def test_share_refuses_bad_targets(target):
    with pytest.raises(ValueError, match="target"):
        prunable_share(torch.ones(3), target)


def test_share_refuses_bad_sources_and_powers():
    with pytest.raises(ValueError, match="power"):
        prunable_share(torch.ones(3), 0.5, power=3)
    with pytest.raises(TypeError, match="PILoT"):
        prunable_share(torch.optim.SGD([nn.Parameter(torch.ones(2, 2))], lr=0.1), 0.5)
    with pytest.raises(ValueError, match="reparameterizes no tensor"):
        prunable_share(PILoT([nn.Parameter(torch.ones(3))], lr=0.1, alpha=1e-3), 0.5)
    with pytest.raises(TypeError, match="tensors"):
        prunable_share([], 0.5)


def test_share_is_re_exported_where_it_was_defined():
    import pilot_kernels
    import pilot_kernels.schedules as schedules

    assert schedules.prunable_share is prunable_share is pilot_kernels.prunable_share
    assert schedules.SHARE_REL_ERROR == SHARE_REL_ERROR
