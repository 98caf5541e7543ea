"""What a torch.optim user expects of any optimizer: copies, hooks, foreign state keys,
named parameters, and bad input that raises before anything changes."""
import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn

import pilot_kernels.optimizer as O
from pilot_kernels import PILoT
from helpers import assert_same_state


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 6, generator=g)).pow(2).mean().backward()
        opt.step()


def _snapshot(model, opt):
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups], opt.l1_norm())


def _assert_unchanged(model, opt, snap):
    params, sd, groups, l1 = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    now = opt.state_dict()
    assert now["param_groups"] == sd["param_groups"]
    assert now["state"].keys() == sd["state"].keys()
    for i, st in sd["state"].items():
        assert now["state"][i].keys() == st.keys()
        for k, v in st.items():
            assert torch.equal(now["state"][i][k], v) if torch.is_tensor(v) else now["state"][i][k] == v
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    assert torch.equal(opt.l1_norm(), l1)


# ------------------------------------------------------------------ copies
def _deepcopy(pair):
    return copy.deepcopy(pair)


def _pickle(pair):
    return pickle.loads(pickle.dumps(pair))


def _torch_save(pair):
    buf = io.BytesIO()
    torch.save(pair, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("clone", [_deepcopy, _pickle, _torch_save], ids=lambda f: f.__name__.strip("_"))
def test_copies_of_model_and_optimizer_train_on_identically(clone):
    model = _model()
    opt = PILoT(model.parameters(), lr=0.05, momentum=0.9, alpha=1e-2, fused_unscale=False)
    _train(model, opt, 2)
    model2, opt2 = clone((model, opt))
    assert opt2._step_supports_amp_scaling is False
    assert all(p2 is q for p2, q in zip(opt2.param_groups[0]["params"], model2.parameters()))
    _train(model, opt, 3, seed=5)
    _train(model2, opt2, 3, seed=5)
    assert_same_state(opt, list(model.parameters()), opt2, list(model2.parameters()), exact=True)
    assert torch.equal(opt.l1_norm(), opt2.l1_norm())


# ------------------------------------------------------------------ hooks and foreign state
def test_load_state_dict_hooks_see_the_whole_state():
    model = _model()
    opt = PILoT(model.parameters(), lr=0.05, momentum=0.9)
    _train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    seen = {}

    def pre(optimizer, state_dict):
        seen["pre"] = set(state_dict["state"][0])
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"][0]["m"] = state_dict["state"][0]["m"] * 2  # a hook may rewrite it
        return state_dict

    def post(optimizer):
        st = optimizer.state[optimizer.param_groups[0]["params"][0]]
        seen["post"] = (set(st), st["m"].clone())

    fresh_model = _model(seed=3)
    fresh = PILoT(fresh_model.parameters(), lr=0.05, momentum=0.9)
    fresh.register_load_state_dict_pre_hook(pre)
    fresh.register_load_state_dict_post_hook(post)
    fresh.load_state_dict(sd)
    keys = {"m", "w", "momentum_m", "momentum_w", "momentum_started"}
    assert seen["pre"] == keys and seen["post"][0] == keys
    assert torch.equal(seen["post"][1], sd["state"][0]["m"] * 2)
    assert torch.equal(fresh.state[next(fresh_model.parameters())]["m"], sd["state"][0]["m"] * 2)


def test_state_not_keyed_by_a_parameter_round_trips():
    model = _model()
    opt = PILoT(model.parameters(), lr=0.05)
    opt.state["epoch"] = 7
    opt.state["log"] = {"note": "kept"}
    _train(model, opt, 1)
    other = PILoT(_model(seed=1).parameters(), lr=0.05)
    other.load_state_dict(opt.state_dict())
    assert other.state["epoch"] == 7 and other.state["log"] == {"note": "kept"}


# ------------------------------------------------------------------ validation when set
def test_named_parameters_get_the_same_validation():
    model = _model().double()
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        PILoT(model.named_parameters(), lr=0.1)
    good = _model()
    before = [p.detach().clone() for p in good.parameters()]
    bad = nn.Linear(2, 2).double()
    with pytest.raises(TypeError, match="float64"):
        PILoT([{"params": list(good.named_parameters())},
               {"params": list(bad.named_parameters()), "lr": 0.2}], lr=0.1)
    for p, p0 in zip(good.parameters(), before):
        assert torch.equal(p, p0)
    opt = PILoT(good.named_parameters(), lr=0.1)  # float32 named parameters are fine
    assert opt.param_groups[0]["param_names"] == [n for n, _ in good.named_parameters()]
    n_groups = len(opt.param_groups)
    with pytest.raises(TypeError, match="complex"):
        opt.add_param_group({"params": [("z", nn.Parameter(torch.zeros(2, 2, dtype=torch.complex64)))]})
    assert len(opt.param_groups) == n_groups


BAD_VALUES = [(name, v) for name in ("lr", "momentum", "alpha", "beta", "weight_decay", "dampening")
              for v in (math.nan, math.inf, -math.inf)]


@pytest.mark.parametrize("name, value", BAD_VALUES)
def test_non_finite_hyperparameters_are_refused_everywhere(name, value):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=name):
        PILoT(model.parameters(), **{"lr": 0.1, name: value})
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p, p0)

    opt = PILoT(list(model.parameters())[:2], lr=0.1)
    _train(model, opt, 1)
    extra = list(model.parameters())[2:]
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": extra, name: value})
    assert len(opt.param_groups) == 1 and all(p not in opt.state for p in extra)

    # A value written into a group (by a schedule, say) is caught at the next step.
    snap = _snapshot(model, opt)
    good = opt.param_groups[0][name]
    opt.param_groups[0][name] = value
    with pytest.raises(ValueError, match=name):
        _train(model, opt, 1)
    opt.param_groups[0][name] = good
    _assert_unchanged(model, opt, snap)

    # ... and in a checkpoint's group.
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0][name] = value
    with pytest.raises(ValueError, match=name):
        opt.load_state_dict(sd)
    _assert_unchanged(model, opt, snap)


def test_unchanged_hyperparameters_are_not_checked_every_step(monkeypatch):
    model = _model()
    opt = PILoT(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    calls = []
    real = O.check_hparams
    monkeypatch.setattr(O, "check_hparams", lambda *a, **k: calls.append(k.get("names")) or real(*a, **k))
    _train(model, opt, 1)  # the first step: one full check
    calls.clear()
    for _ in range(4):
        _train(model, opt, 1)
        sched.step()
    _train(model, opt, 1)
    assert calls == [["lr"], ["lr"]]  # only after StepLR changed lr (twice), and only lr


def test_huge_weights_split_without_overflow():
    w = nn.Parameter(torch.tensor([[3e38, -1e20], [1.0, 1e-30]]))
    opt = PILoT([w], lr=0.0, momentum=0.0)
    m, v = opt.state[w]["m"], opt.state[w]["w"]
    assert torch.isfinite(m).all() and torch.isfinite(v).all()
    torch.testing.assert_close(m * v, w.detach(), rtol=2.0**-22, atol=0.0)
    w.grad = torch.zeros_like(w)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[3e38, -1e20], [1.0, 1e-30]]), rtol=2.0**-22, atol=0.0)


# ------------------------------------------------------------------ load_state_dict failures
def _damaged(sd, how):
    sd = copy.deepcopy(sd)
    if how == "unknown id":
        sd["state"][99] = sd["state"][0]
    elif how == "no state key":
        del sd["state"]
    elif how == "no params in group":
        del sd["param_groups"][0]["params"]
    elif how == "w missing":
        del sd["state"][2]["w"]
    elif how == "one momentum":
        del sd["state"][2]["momentum_w"]
    elif how == "bad shape last":
        sd["state"][3]["momentum_buffer"] = torch.zeros(7)
    elif how == "reparam mismatch":
        del sd["state"][0]["m"]
    return sd


@pytest.mark.parametrize("how", ["unknown id", "no state key", "no params in group", "w missing",
                                 "one momentum", "bad shape last", "reparam mismatch"])
def test_failed_load_state_dict_changes_nothing(how):
    model = _model()
    opt = PILoT(model.parameters(), lr=0.05, momentum=0.9, alpha=1e-2)
    _train(model, opt, 2)
    other_model = _model(seed=4)
    other = PILoT(other_model.parameters(), lr=0.05, momentum=0.9)
    _train(other_model, other, 3)
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(_damaged(other.state_dict(), how))
    _assert_unchanged(model, opt, snap)
    _train(model, opt, 1)  # and it still trains


def test_old_checkpoint_without_newer_group_keys_gets_the_defaults():
    model = _model()
    opt = PILoT(model.parameters(), lr=0.05, momentum=0.9, alpha=1e-2, beta=0.5, capturable=False)
    _train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    for key in ("beta", "capturable", "backend", "reparam"):
        del sd["param_groups"][0][key]
    for st in sd["state"].values():
        del st["momentum_started"]  # older checkpoints: a saved buffer meant started
    fresh_model = _model(seed=2)
    fresh_model.load_state_dict(model.state_dict())
    fresh = PILoT(fresh_model.parameters(), lr=0.1, beta=0.5)
    fresh.load_state_dict(sd)
    group = fresh.param_groups[0]
    assert group["beta"] == 0.5 and group["capturable"] is False and group["backend"] == "auto"
    assert group["lr"] == 0.05 and all(s["momentum_started"] for s in fresh.state.values())
    _train(model, opt, 2, seed=3)
    _train(fresh_model, fresh, 2, seed=3)
    assert_same_state(opt, list(model.parameters()), fresh, list(fresh_model.parameters()), exact=True)


# ------------------------------------------------------------------ sparse gradients
def test_sparse_gradients_are_refused_before_anything_changes():
    model = _model()
    emb = nn.Embedding(10, 4, sparse=True)
    opt = PILoT([{"params": model.parameters()}, {"params": emb.parameters(), "reparam": False}], lr=0.1)
    _train(model, opt, 1)
    model(torch.randn(2, 6)).sum().backward()
    emb(torch.tensor([1, 2])).sum().backward()
    params = list(model.parameters()) + list(emb.parameters())
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match="sparse gradients.*SGD"):
        opt.step()
    for p, p0 in zip(params, before):
        assert torch.equal(p, p0)
    for i, st in state["state"].items():
        for k, v in st.items():
            now = opt.state_dict()["state"][i][k]
            assert torch.equal(now, v) if torch.is_tensor(v) else now == v
