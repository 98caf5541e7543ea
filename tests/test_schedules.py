"""Tests for pilot_kernels.schedules: the α schedules (paper appendix C.1, Algorithm 1) and
how they travel with the optimizer's state_dict."""
import math

import pytest
import torch
from torch import nn

from pilot_kernels import PILoT
from pilot_kernels.schedules import (
    AdaptiveAlpha,
    AlphaScheduler,
    ConstantAlpha,
    GeometricAlpha,
    HarmonicAlpha,
    QuadraticAlpha,
    TargetSparsity,
)

ALPHA0 = (1e-3, 4e-2)  # two groups with different α0: schedules must keep each group's own


def make_optimizer(alphas=ALPHA0, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = PILoT(
        [
            {"params": list(model[0].parameters()), "alpha": alphas[0]},
            {"params": list(model[2].parameters()), "alpha": alphas[1]},
        ],
        lr=0.05,
        momentum=0.9,
    )
    return model, opt


def group_alphas(opt):
    return [g["alpha"] for g in opt.param_groups]


def close(a, b):
    return all(math.isclose(x, y, rel_tol=1e-12, abs_tol=0.0) for x, y in zip(a, b)) and len(a) == len(b)


# Closed forms written out independently of the implementation; n = number of step() calls.
STATIC = {
    "constant": (lambda opt: ConstantAlpha(opt), lambda a0, n: a0),
    "harmonic": (lambda opt: HarmonicAlpha(opt), lambda a0, n: a0 / (n + 1)),
    "quadratic": (lambda opt: QuadraticAlpha(opt), lambda a0, n: a0 / (n + 1) ** 2),
    "geometric": (lambda opt: GeometricAlpha(opt), lambda a0, n: a0 * 0.95**n),
    "geometric_p0.5": (lambda opt: GeometricAlpha(opt, p=0.5), lambda a0, n: a0 * 0.5**n),
}


@pytest.mark.parametrize("name", sorted(STATIC))
def test_static_schedules_follow_their_formula(name):
    make_sched, formula = STATIC[name]
    _, opt = make_optimizer()
    sched = make_sched(opt)
    assert sched.last_epoch == 0
    for n in range(8):
        expected = [formula(a0, n) for a0 in ALPHA0]
        assert close(group_alphas(opt), expected), (n, group_alphas(opt), expected)
        assert close(sched.get_last_alpha(), expected)
        assert sched.last_epoch == n
        sched.step()
    assert [g["initial_alpha"] for g in opt.param_groups] == list(ALPHA0)


def test_first_period_is_alpha0_for_every_schedule():
    for make_sched, _ in STATIC.values():
        _, opt = make_optimizer()
        make_sched(opt)
        assert group_alphas(opt) == list(ALPHA0)
    _, opt = make_optimizer()
    AdaptiveAlpha(opt, total_epochs=10)
    assert group_alphas(opt) == list(ALPHA0)


def test_harmonic_explicit_values():
    _, opt = make_optimizer(alphas=(1.0, 2.0))
    sched = HarmonicAlpha(opt)
    seen = [sched.get_last_alpha()]
    for _ in range(3):
        sched.step()
        seen.append(sched.get_last_alpha())
    assert close(sum(seen, []), [1.0, 2.0, 1 / 2, 1.0, 1 / 3, 2 / 3, 1 / 4, 2 / 4])


def test_get_last_alpha_is_a_copy():
    _, opt = make_optimizer()
    sched = HarmonicAlpha(opt)
    sched.get_last_alpha()[0] = 123.0
    assert sched.get_last_alpha() == list(ALPHA0)


def test_static_schedule_uses_initial_alpha_not_current():
    _, opt = make_optimizer()
    sched = QuadraticAlpha(opt)
    opt.param_groups[0]["alpha"] = 7.0  # someone overwrote it
    sched.step()
    assert close(group_alphas(opt), [a / 4 for a in ALPHA0])


def test_initial_alpha_setdefault_is_kept_by_a_second_scheduler():
    _, opt = make_optimizer()
    HarmonicAlpha(opt).step()
    sched = HarmonicAlpha(opt)  # like lr schedulers: base values come from initial_alpha
    assert sched.base_alphas == list(ALPHA0)
    assert group_alphas(opt) == list(ALPHA0)


def test_resume_with_last_epoch_needs_initial_alpha():
    _, opt = make_optimizer()
    with pytest.raises(KeyError, match="initial_alpha"):
        HarmonicAlpha(opt, last_epoch=4)
    for g in opt.param_groups:
        g["initial_alpha"] = g["alpha"]
    sched = HarmonicAlpha(opt, last_epoch=4)
    assert sched.last_epoch == 5
    assert close(group_alphas(opt), [a / 6 for a in ALPHA0])


def test_rejects_optimizer_without_alpha():
    model = nn.Linear(3, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    for make in (ConstantAlpha, HarmonicAlpha, QuadraticAlpha, GeometricAlpha):
        with pytest.raises(ValueError, match="PILoT"):
            make(sgd)
    with pytest.raises(ValueError, match="PILoT"):
        AdaptiveAlpha(sgd, total_epochs=3)
    assert "initial_alpha" not in sgd.param_groups[0]
    with pytest.raises(TypeError, match="not an Optimizer"):
        HarmonicAlpha(model)


def test_adaptive_needs_l1_norm():
    model = nn.Linear(3, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    sgd.param_groups[0]["alpha"] = 1e-3
    HarmonicAlpha(sgd)  # static schedules only need the key
    with pytest.raises(TypeError, match="l1_norm"):
        AdaptiveAlpha(sgd, total_epochs=3)


def test_base_class_needs_a_factor():
    _, opt = make_optimizer()
    with pytest.raises(NotImplementedError, match="_factor"):
        AlphaScheduler(opt)


@pytest.mark.parametrize("p", [0.0, -0.5, 1.5, float("nan")])
def test_geometric_rejects_bad_p(p):
    _, opt = make_optimizer()
    with pytest.raises(ValueError, match="0 < p <= 1"):
        GeometricAlpha(opt, p=p)
    assert group_alphas(opt) == list(ALPHA0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(total_epochs=10, delta=0.99), "delta must be a finite number >= 1"),
        (dict(total_epochs=10, delta=float("nan")), "delta must be a finite number >= 1"),
        (dict(total_epochs=10, delta=float("inf")), "delta must be a finite number >= 1"),
        (dict(total_epochs=10, delta="1.01"), "delta must be a finite number >= 1"),
        (dict(total_epochs=10, delta=True), "delta must be a finite number >= 1"),
        (dict(total_epochs=0), "total_epochs"),
        (dict(total_epochs=2.5), "total_epochs"),
        (dict(total_epochs=10, l1_threshold=-1.0), "K must be a finite number >= 0"),
        (dict(total_epochs=10, l1_threshold=float("inf")), "K must be a finite number >= 0"),
        (dict(total_epochs=10, l1_threshold=float("nan")), "K must be a finite number >= 0"),
    ],
)
def test_adaptive_rejects_bad_hyperparameters(kwargs, match):
    _, opt = make_optimizer()
    before = opt.state_dict()
    with pytest.raises(ValueError, match=match):
        AdaptiveAlpha(opt, **kwargs)
    assert group_alphas(opt) == list(ALPHA0)
    assert "initial_alpha" not in opt.param_groups[0]
    assert opt.state_dict()["param_groups"] == before["param_groups"]


def test_adaptive_refuses_alpha0_zero_which_can_never_grow():
    _, opt = make_optimizer(alphas=(0.0, 0.0))
    with pytest.raises(ValueError, match="alpha > 0"):
        AdaptiveAlpha(opt, total_epochs=10)
    assert "initial_alpha" not in opt.param_groups[0]
    # One group at 0 beside a positive one keeps its ratio (0) and is allowed.
    _, opt = make_optimizer(alphas=(0.0, 1e-3))
    AdaptiveAlpha(opt, total_epochs=10)
    # Only groups with reparameterized tensors count: a plain-SGD group's α is never used.
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = PILoT([{"params": [model.weight], "alpha": 0.0}, {"params": [model.bias], "alpha": 1.0}], lr=0.1)
    with pytest.raises(ValueError, match="can never grow"):
        AdaptiveAlpha(opt, total_epochs=10)


class FakeL1:
    """Replaces PILoT.l1_norm with a scripted sequence of 0-dim tensors."""

    def __init__(self, values):
        self.values = list(values)
        self.calls = 0

    def __call__(self):
        v = self.values[self.calls]
        self.calls += 1
        return torch.tensor(v)


def test_adaptive_against_hand_simulation():
    _, opt = make_optimizer()
    T, delta, K = 10, 1.1, 100.0
    #          k:    1     2     3     4     5      6     7     8
    accs = [0.30, 0.20, 0.25, 0.25, 0.90, 0.95, 0.99, 0.10]
    l1s = [500.0, 500.0, 100.0, 500.0, 101.0, 500.0, 500.0, 500.0]
    # k=1: 0.30 >= a0=0, L1 > K, 1 <= 5                    -> up
    # k=2: accuracy fell (0.20 < 0.30)                    -> down
    # k=3: acc rose but L1 == K is not > K               -> down
    # k=4: equal accuracy counts (>=), L1 > K             -> up
    # k=5: k == T/2 still grows                           -> up
    # k=6: all good but k > T/2                           -> down
    # k=7, 8: second half                                 -> down
    exponents = [+1, -1, -1, +1, +1, -1, -1, -1]
    opt.l1_norm = FakeL1(l1s)
    sched = AdaptiveAlpha(opt, total_epochs=T, delta=delta, l1_threshold=K)
    e = 0
    for k, (acc, step_exp) in enumerate(zip(accs, exponents), start=1):
        sched.step(acc)
        e += step_exp
        expected = [a0 * delta**e for a0 in ALPHA0]
        assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(group_alphas(opt), expected)), k
        assert sched.last_epoch == k
        assert sched.previous_acc == acc  # a_{k-1} is the previous epoch's, not the best
        assert sched.last_l1 == l1s[k - 1]
    assert opt.l1_norm.calls == len(accs)  # exactly one read per epoch
    # groups keep their ratio
    assert math.isclose(group_alphas(opt)[1] / group_alphas(opt)[0], ALPHA0[1] / ALPHA0[0], rel_tol=1e-12)


def test_adaptive_half_rule_with_odd_T():
    _, opt = make_optimizer()
    opt.l1_norm = FakeL1([1.0] * 5)
    sched = AdaptiveAlpha(opt, total_epochs=5, delta=2.0, l1_threshold=0.0)
    for acc in (0.1, 0.2, 0.3, 0.4, 0.5):
        sched.step(acc)
    # k=1,2 <= 2.5 up; k=3,4,5 down: net exponent -1
    assert close(group_alphas(opt), [a / 2 for a in ALPHA0])


def test_adaptive_delta_one_is_constant():
    _, opt = make_optimizer()
    sched = AdaptiveAlpha(opt, total_epochs=4, delta=1.0)
    for acc in (0.5, 0.1, 0.9, 0.2, 0.3):
        sched.step(acc)
    assert group_alphas(opt) == list(ALPHA0)


def test_adaptive_accepts_tensor_accuracy_and_rejects_bad_ones():
    _, opt = make_optimizer()
    opt.l1_norm = FakeL1([10.0] * 3)
    sched = AdaptiveAlpha(opt, total_epochs=10, delta=2.0)
    sched.step(torch.tensor(0.5))
    assert close(group_alphas(opt), [2 * a for a in ALPHA0])
    assert sched.previous_acc == 0.5 and isinstance(sched.previous_acc, float)
    sched.step(torch.tensor([0.6]))  # one element is fine
    assert close(group_alphas(opt), [4 * a for a in ALPHA0])
    for bad, exc in ((torch.tensor([0.1, 0.2]), ValueError), (float("nan"), ValueError), ("0.5", TypeError)):
        with pytest.raises(exc):
            sched.step(bad)
    assert sched.last_epoch == 2 and sched.previous_acc == pytest.approx(0.6)
    assert close(group_alphas(opt), [4 * a for a in ALPHA0])


# Near chance (chance=): Algorithm 1 raises α whenever the accuracy did not drop.

def adaptive_run(accs, l1=500.0, **kwargs):
    _, opt = make_optimizer()
    opt.l1_norm = FakeL1([l1] * len(accs))
    sched = AdaptiveAlpha(opt, total_epochs=20, delta=1.1, **kwargs)
    seen, actions = [group_alphas(opt)], []
    for acc in accs:
        sched.step(acc)
        seen.append(group_alphas(opt))
        actions.append(sched.last_action)
    return seen, actions


def test_adaptive_at_chance_never_raises_alpha_and_cuts_it():
    accs = [0.50, 0.50, 0.51, 0.52, 0.52, 0.55, 0.58, 0.60]  # 2 classes: never clearly above chance
    blind, _ = adaptive_run(accs)
    assert blind[-1][0] > blind[0][0]  # Algorithm 1 alone: every step grows
    seen, actions = adaptive_run(accs, chance=0.5)
    assert actions == ["chance"] * len(accs)
    for before, after in zip(seen, seen[1:]):
        assert close(after, [a / 1.1 for a in before])


def test_adaptive_collapsing_towards_chance_cuts_alpha():
    """A noisy collapse: the small rises (0.72 after 0.70) would grow α under Algorithm 1."""
    accs = [0.80, 0.95, 0.70, 0.72, 0.60, 0.65]
    _, blind = adaptive_run(accs)
    assert blind == ["grow", "grow", "shrink", "grow", "shrink", "grow"]
    seen, actions = adaptive_run(accs, chance=0.5)
    # 0.72 - 0.5 = 0.22 <= 0.5 · (0.95 - 0.5): fallen halfway back
    assert actions == ["grow", "grow", "chance", "chance", "chance", "chance"]
    assert all(after[0] < before[0] for before, after in zip(seen[2:], seen[3:]))


def test_adaptive_healthy_run_is_unchanged_by_chance():
    accs = [0.30, 0.22, 0.25, 0.25, 0.90, 0.95, 0.99, 0.93]  # 10 classes
    blind = adaptive_run(accs)
    assert adaptive_run(accs, chance=0.1) == blind
    assert blind[1] == ["grow", "shrink", "grow", "grow", "grow", "grow", "grow", "shrink"]


def test_adaptive_refuses_a_bad_chance():
    _, opt = make_optimizer()
    for bad in (0.0, -1.0, math.nan, math.inf, True, "0.1"):
        with pytest.raises(ValueError, match="chance"):
            AdaptiveAlpha(opt, total_epochs=10, chance=bad)
    assert "initial_alpha" not in opt.param_groups[0] and group_alphas(opt) == list(ALPHA0)


def test_adaptive_with_real_l1_crossing_threshold():
    """A real PILoT whose L1 shrinks under a large α and zero gradients: α grows
    while L1 > K, then decays once L1 has crossed K (accuracy keeps rising)."""
    torch.manual_seed(0)
    model = nn.Linear(20, 10, bias=False)
    opt = PILoT(model.parameters(), lr=0.1, momentum=0.0, alpha=0.05)
    l1_start = float(opt.l1_norm())
    K = 0.9 * l1_start
    sched = AdaptiveAlpha(opt, total_epochs=100, delta=1.01, l1_threshold=K)
    model.weight.grad = torch.zeros_like(model.weight)
    decisions = []
    for epoch in range(1, 8):
        opt.step()  # m, w shrink by (1 - 2 lr α) each step: L1 falls monotonically
        l1 = float(opt.l1_norm())
        before = opt.param_groups[0]["alpha"]
        sched.step(0.1 * epoch)
        decisions.append(opt.param_groups[0]["alpha"] > before)
        assert decisions[-1] == (l1 > K)
        assert sched.last_l1 == l1
    assert decisions[0] and not decisions[-1]  # the threshold was crossed in between


def run_static(make_sched, opt, sched_state=None, n=4):
    sched = make_sched(opt)
    if sched_state is not None:
        sched.load_state_dict(sched_state)
    out = []
    for _ in range(n):
        sched.step()
        out.append(sched.get_last_alpha())
    return sched, out


@pytest.mark.parametrize("name", sorted(STATIC))
def test_static_state_dict_round_trip(name):
    make_sched, _ = STATIC[name]
    _, opt = make_optimizer()
    sched = make_sched(opt)
    for _ in range(3):
        sched.step()
    saved_sched, saved_opt = sched.state_dict(), opt.state_dict()
    assert "optimizer" not in saved_sched and saved_sched["last_epoch"] == 3
    expected = []
    for _ in range(4):
        sched.step()
        expected.append(sched.get_last_alpha())

    _, opt2 = make_optimizer(alphas=(9.0, 9.0))  # different α0: must come from the checkpoint
    sched2 = make_sched(opt2)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert sched2.last_epoch == 3 and sched2.get_last_alpha() == saved_sched["_last_alpha"]
    got = []
    for _ in range(4):
        sched2.step()
        got.append(sched2.get_last_alpha())
    assert got == expected


def test_adaptive_state_dict_round_trip():
    accs = [0.1, 0.3, 0.2, 0.4, 0.5, 0.45, 0.6, 0.7, 0.8]
    l1s = [50.0, 50.0, 50.0, 5.0, 50.0, 50.0, 50.0, 50.0, 50.0]

    _, opt = make_optimizer()
    opt.l1_norm = FakeL1(l1s)
    sched = AdaptiveAlpha(opt, total_epochs=12, delta=1.05, l1_threshold=10.0)
    for acc in accs[:4]:
        sched.step(acc)
    saved_sched, saved_opt = sched.state_dict(), opt.state_dict()
    assert saved_sched["previous_acc"] == 0.4
    assert "optimizer" not in saved_sched
    expected = []
    for acc in accs[4:]:
        sched.step(acc)
        expected.append(sched.get_last_alpha())

    _, opt2 = make_optimizer(alphas=(5.0, 5.0))
    opt2.l1_norm = FakeL1(l1s[4:])
    sched2 = AdaptiveAlpha(opt2, total_epochs=1)  # hyperparameters come from the state_dict
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert (sched2.total_epochs, sched2.delta, sched2.l1_threshold, sched2.last_epoch) == (12, 1.05, 10.0, 4)
    got = []
    for acc in accs[4:]:
        sched2.step(acc)
        got.append(sched2.get_last_alpha())
    assert got == expected


def test_load_state_dict_rejects_other_group_count():
    _, opt = make_optimizer()
    state = HarmonicAlpha(opt).state_dict()
    model = nn.Linear(2, 2)
    opt1 = PILoT(model.parameters(), lr=0.1, alpha=1e-3)
    sched = HarmonicAlpha(opt1)
    with pytest.raises(ValueError, match="param groups"):
        sched.load_state_dict(state)
    assert sched.base_alphas == [1e-3]


def test_schedule_drives_the_optimizer_step():
    """The α written by a scheduler is the α the next PILoT step uses."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    opt = PILoT(model.parameters(), lr=0.1, momentum=0.0, alpha=0.5)
    sched = HarmonicAlpha(opt)
    sched.step()  # α = 0.25
    m0, w0 = opt.state[model.weight]["m"].clone(), opt.state[model.weight]["w"].clone()
    model.weight.grad = torch.zeros_like(model.weight)
    opt.step()
    torch.testing.assert_close(opt.state[model.weight]["m"], m0 * (1 - 0.1 * 2 * 0.25))
    torch.testing.assert_close(opt.state[model.weight]["w"], w0 * (1 - 0.1 * 2 * 0.25))


# ---------------------------------------------------------------------------------------
# The schedule travels with the optimizer's state_dict.

SCHEDULES = {
    "harmonic": (lambda opt, **kw: HarmonicAlpha(opt, **kw), lambda s, acc: s.step()),
    "geometric": (lambda opt, **kw: GeometricAlpha(opt, p=0.7, **kw), lambda s, acc: s.step()),
    "adaptive": (
        lambda opt, **kw: AdaptiveAlpha(opt, total_epochs=6, delta=1.5, l1_threshold=1.0, **kw),
        lambda s, acc: s.step(acc),
    ),
    # Reads the real weights: grows, shrinks on the accuracy drops of ACCS, then decays.
    "target": (
        lambda opt, **kw: TargetSparsity(opt, 0.5, 6, tolerance=0.05, decay_start=0.5, **kw),
        lambda s, acc: s.step(acc),
    ),
}
ACCS = [0.2, 0.5, 0.4, 0.6, 0.7, 0.65, 0.9]


def train_epochs(model, opt, sched, step_sched, epochs, seed):
    """A few real PILoT steps per epoch, then the schedule's epoch step."""
    g = torch.Generator().manual_seed(seed)
    for epoch in epochs:
        for _ in range(2):
            x = torch.randn(4, 6, generator=g)
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        step_sched(sched, ACCS[epoch])


def snapshot(model, opt, sched):
    return (
        [p.detach().clone() for p in model.parameters()],
        [g["alpha"] for g in opt.param_groups],
        {k: v for k, v in sched.state_dict().items()},
    )


def assert_same_run(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert a[1] == b[1] and a[2] == b[2]


@pytest.mark.parametrize("built", ["before_load", "after_load"])
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_resume_from_the_optimizer_state_dict_alone_is_exact(name, built):
    """Only opt.state_dict() is saved (through torch.save); α, the scheduler's counters
    and the parameters continue exactly, whether the new scheduler is built before the
    load or after it (as a framework callback does)."""
    import io

    make, step = SCHEDULES[name]
    model, opt = make_optimizer()
    sched = make(opt)
    train_epochs(model, opt, sched, step, range(3), seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train_epochs(model, opt, sched, step, range(3, 7), seed=2)
    expected = snapshot(model, opt, sched)
    assert sched.last_epoch == 7

    model2, opt2 = make_optimizer(alphas=(3.0, 4.0), seed=5)  # another α0 and init
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # plain data only: loads with weights_only
    if built == "before_load":
        sched2 = make(opt2)
        model2.load_state_dict(ckpt["model"])
        opt2.load_state_dict(ckpt["opt"])
    else:
        model2.load_state_dict(ckpt["model"])
        opt2.load_state_dict(ckpt["opt"])
        sched2 = make(opt2)
    assert sched2.last_epoch == 3 and group_alphas(opt2) == sched2.get_last_alpha()
    train_epochs(model2, opt2, sched2, step, range(3, 7), seed=2)
    assert_same_run(snapshot(model2, opt2, sched2), expected)


def test_saved_progress_is_a_snapshot_and_sits_in_every_group():
    _, opt = make_optimizer()
    sched = HarmonicAlpha(opt)
    sd = opt.state_dict()
    sched.step()
    sched.step()
    entries = [g["alpha_schedulers"] for g in sd["param_groups"]]
    assert entries[0] == entries[1] and len(entries[0]) == 1
    assert entries[0][0]["type"] == "HarmonicAlpha" and entries[0][0]["state"]["last_epoch"] == 0
    assert opt.state_dict()["param_groups"][0]["alpha_schedulers"][0]["state"]["last_epoch"] == 2
    # Attributes written by hand are saved too (the state_dict pre-hook re-reads them).
    sched.last_epoch = 11
    assert opt.state_dict()["param_groups"][1]["alpha_schedulers"][0]["state"]["last_epoch"] == 11


def test_settings_come_from_the_constructor_progress_from_the_checkpoint():
    _, opt = make_optimizer()
    opt.l1_norm = FakeL1([50.0] * 3)
    sched = AdaptiveAlpha(opt, total_epochs=12, delta=1.05, l1_threshold=10.0)
    for acc in (0.1, 0.3):
        sched.step(acc)
    _, opt2 = make_optimizer()
    opt2.load_state_dict(opt.state_dict())
    sched2 = AdaptiveAlpha(opt2, total_epochs=20, delta=1.2)  # a longer run, another δ
    assert (sched2.total_epochs, sched2.delta, sched2.l1_threshold) == (20, 1.2, 0.0)
    assert (sched2.last_epoch, sched2.previous_acc, sched2.last_l1) == (2, 0.3, 50.0)
    assert sched2.base_alphas == list(ALPHA0) and group_alphas(opt2) == group_alphas(opt)


def test_several_schedulers_are_restored_in_the_order_they_were_built():
    _, opt = make_optimizer()
    first, second = HarmonicAlpha(opt), GeometricAlpha(opt, p=0.5)
    first.step()
    for _ in range(3):
        second.step()
    sd = opt.state_dict()
    assert [e["type"] for e in sd["param_groups"][0]["alpha_schedulers"]] == ["HarmonicAlpha", "GeometricAlpha"]

    _, opt2 = make_optimizer()
    opt2.load_state_dict(sd)
    a, b = HarmonicAlpha(opt2), GeometricAlpha(opt2, p=0.5)
    assert (a.last_epoch, b.last_epoch) == (1, 3)
    assert a.get_last_alpha() == first.get_last_alpha() and b.get_last_alpha() == second.get_last_alpha()

    # Built in another order: a saved schedule of another class is not applied.
    _, opt3 = make_optimizer()
    opt3.load_state_dict(sd)
    with pytest.warns(UserWarning, match="HarmonicAlpha"):
        g = GeometricAlpha(opt3, p=0.5)
    assert g.last_epoch == 0 and group_alphas(opt3) == list(ALPHA0)


def harmonic_state_dict(steps):
    """The state_dict of an optimizer whose HarmonicAlpha took ``steps`` steps."""
    _, opt = make_optimizer()
    sched = HarmonicAlpha(opt)
    for _ in range(steps):
        sched.step()
    return opt.state_dict()


def test_restart_with_resume_false_and_dropped_schedulers_are_not_saved():
    sd = harmonic_state_dict(4)
    _, opt2 = make_optimizer()
    opt2.load_state_dict(sd)
    fresh = HarmonicAlpha(opt2, resume=False)
    assert fresh.last_epoch == 0 and group_alphas(opt2) == list(ALPHA0)
    with pytest.raises(TypeError, match="resume"):
        HarmonicAlpha(opt2, resume=1)
    del fresh  # a scheduler nobody holds drives nothing and is not saved
    assert "alpha_schedulers" not in opt2.state_dict()["param_groups"][0]


def test_loading_and_saving_without_a_scheduler_keeps_the_schedule():
    _, opt = make_optimizer()
    sched = GeometricAlpha(opt, p=0.5)
    sched.step()
    _, opt2 = make_optimizer()
    opt2.load_state_dict(opt.state_dict())  # e.g. a conversion script: no scheduler built
    _, opt3 = make_optimizer()
    opt3.load_state_dict(opt2.state_dict())
    assert GeometricAlpha(opt3, p=0.5).last_epoch == 1


def test_deepcopy_of_optimizer_and_of_scheduler():
    import copy

    _, opt = make_optimizer()
    sched = HarmonicAlpha(opt)
    sched.step()
    opt_copy = copy.deepcopy(opt)  # carries the schedule: a scheduler built on it continues
    assert HarmonicAlpha(opt_copy).last_epoch == 1

    sched_copy = copy.deepcopy(sched)  # drives (and is saved with) its own optimizer copy
    assert sched_copy.optimizer is not opt
    sched_copy.step()
    assert sched.last_epoch == 1 and close(group_alphas(opt), [a / 2 for a in ALPHA0])
    assert close(group_alphas(sched_copy.optimizer), [a / 3 for a in ALPHA0])
    saved = sched_copy.optimizer.state_dict()["param_groups"][0]["alpha_schedulers"]
    assert [e["state"]["last_epoch"] for e in saved] == [2]


def test_pickled_scheduler_drives_and_saves_its_own_optimizer():
    import pickle

    _, opt = make_optimizer()
    sched = GeometricAlpha(opt, p=0.5)
    sched.step()
    clone = pickle.loads(pickle.dumps(sched))  # torch.save(sched) pickles the same way
    clone.step()
    assert sched.last_epoch == 1 and clone.last_epoch == 2
    assert close(group_alphas(clone.optimizer), [a / 4 for a in ALPHA0])
    saved = clone.optimizer.state_dict()["param_groups"][0]["alpha_schedulers"]
    assert [e["state"]["last_epoch"] for e in saved] == [2]


# Entries an optimizer's state_dict carried before the controllers shared a base (and
# before chance=): written by that version, AdaptiveAlpha and TargetSparsity on one optimizer.
OLD_ENTRIES = [
    {"type": "AdaptiveAlpha", "state": {
        "total_epochs": 10, "delta": 2.0, "l1_threshold": 0.0, "previous_acc": 0.25, "last_l1": 50.0,
        "_multiplier": 1.0, "base_alphas": [0.001, 0.04], "last_epoch": 2, "_last_alpha": [0.0015, 0.06]}},
    {"type": "TargetSparsity", "state": {
        "target": 0.5, "tolerance": 0.05, "decay": 0.5, "total_epochs": 10, "grow": 1.5, "shrink": 1.5,
        "decay_start": 0.75, "acc_tolerance": 0.01, "best_acc": 0.5, "last_share": 0.23035261155373146,
        "last_action": "shrink", "_multiplier": 1.0, "base_alphas": [0.001, 0.04], "last_epoch": 2,
        "_last_alpha": [0.001, 0.039999999999999994]}},
]


def test_checkpoints_from_before_the_controller_base_load():
    _, opt = make_optimizer()
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        group["alpha_schedulers"] = OLD_ENTRIES
    _, opt2 = make_optimizer()
    opt2.load_state_dict(sd)
    adaptive = AdaptiveAlpha(opt2, total_epochs=10, delta=2.0, chance=0.1)
    target = TargetSparsity(opt2, 0.5, 10, tolerance=0.05, chance=0.1)
    assert (adaptive.last_epoch, adaptive.previous_acc, adaptive.last_l1) == (2, 0.25, 50.0)
    assert (target.last_epoch, target.best_acc, target.last_share, target.last_action) == (
        2, 0.5, 0.23035261155373146, "shrink")
    # Keys the old entries lack keep the constructor's values; the obsolete one is dropped.
    assert (adaptive.chance, adaptive.best_acc, adaptive.last_action, target.chance) == (0.1, 0.0, None, 0.1)
    for sched in (adaptive, target):
        assert "_multiplier" not in sched.state_dict()
    # The scheduler's own old state_dict loads the same way.
    again = AdaptiveAlpha(make_optimizer()[1], total_epochs=3)
    again.load_state_dict(OLD_ENTRIES[0]["state"])
    assert (again.total_epochs, again.delta, again.last_epoch) == (10, 2.0, 2)
    assert "_multiplier" not in again.state_dict() and again.chance is None
    opt2.l1_norm = FakeL1([50.0])
    adaptive.step(0.3)
    assert adaptive.last_action == "grow" and adaptive.best_acc == 0.3


def test_chance_is_a_setting_saved_with_the_scheduler():
    _, opt = make_optimizer()
    opt.l1_norm = FakeL1([50.0] * 2)
    sched = AdaptiveAlpha(opt, total_epochs=10, chance=0.5)
    sched.step(0.9)
    assert sched.state_dict()["chance"] == 0.5 and sched.state_dict()["best_acc"] == 0.9
    _, opt2 = make_optimizer()
    opt2.load_state_dict(opt.state_dict())
    resumed = AdaptiveAlpha(opt2, total_epochs=10, chance=0.25)  # settings: the constructor's
    assert (resumed.chance, resumed.best_acc, resumed.last_action) == (0.25, 0.9, "grow")
    fresh = AdaptiveAlpha(make_optimizer()[1], total_epochs=10)
    fresh.load_state_dict(sched.state_dict())  # the scheduler's own state: settings too
    assert fresh.chance == 0.5


def test_the_schedule_restored_is_the_one_the_optimizer_loaded():
    """A load pre-hook that rewrites the state_dict (registered after the scheduler was
    built) decides what the scheduler gets."""
    sd = harmonic_state_dict(3)
    _, opt2 = make_optimizer()
    sched2 = HarmonicAlpha(opt2)

    def drop_schedules(optimizer, state_dict):
        groups = [{k: v for k, v in g.items() if k != "alpha_schedulers"} for g in state_dict["param_groups"]]
        return {**state_dict, "param_groups": groups}

    handle = opt2.register_load_state_dict_pre_hook(drop_schedules)
    opt2.load_state_dict(sd)
    assert sched2.last_epoch == 0  # no schedule loaded: left alone
    handle.remove()
    opt2.load_state_dict(sd)
    assert sched2.last_epoch == 3


class DictPicklingSGD(torch.optim.SGD):
    """Pickles its whole __dict__, as accelerate's AcceleratedOptimizer does."""

    def __getstate__(self):
        return dict(self.__dict__)


def test_an_optimizer_that_pickles_its_dict_still_pickles():
    import pickle

    model = nn.Linear(3, 2)
    sgd = DictPicklingSGD([{"params": model.parameters(), "alpha": 1e-3}], lr=0.1)
    sched = GeometricAlpha(sgd, p=0.5)
    sched.step()
    clone = pickle.loads(pickle.dumps(sgd))  # the record of attached schedulers is not on the optimizer
    assert GeometricAlpha(clone, p=0.5).last_epoch == 1


@pytest.mark.parametrize("flatten", [False, True])
def test_torch_distributed_checkpoint_round_trip(tmp_path, flatten):
    """get/set_optimizer_state_dict + dcp.save/load (single process): the schedule comes
    back with the optimizer, in both of DCP's optimizer layouts."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model, opt = make_optimizer()
    opt.l1_norm = FakeL1([50.0] * 2)
    sched = AdaptiveAlpha(opt, total_epochs=10, delta=1.5)
    sched.step(0.4)
    sched.step(0.2)
    dcp.save({"optim": get_optimizer_state_dict(model, opt, options=options)}, checkpoint_id=str(tmp_path))

    model2, opt2 = make_optimizer(alphas=(2.0, 3.0), seed=3)
    sched2 = AdaptiveAlpha(opt2, total_epochs=10, delta=1.5)  # before the template: DCP loads what it asks for
    sd = {"optim": get_optimizer_state_dict(model2, opt2, options=options)}
    dcp.load(sd, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(model2, opt2, sd["optim"], options=options)
    assert sched2.state_dict() == sched.state_dict()
    assert group_alphas(opt2) == group_alphas(opt)
