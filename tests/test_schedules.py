"""Schedules against torch.optim.lr_scheduler step by step, ReduceOnPlateau against ReduceLROnPlateau,
warm-up, make_schedule and its errors."""

import pickle

import pytest
import torch
from torch.optim import lr_scheduler as L

from convdescent import optim

BASE = 0.1


def torch_lrs(make_scheduler, steps, base=BASE):
    """The lr torch's scheduler gives for each of ``steps`` updates (read before each update)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = make_scheduler(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def assert_same(ours, ref):
    assert len(ours) == len(ref)
    for t, (a, b) in enumerate(zip(ours, ref)):
        assert a == pytest.approx(b, rel=1e-10, abs=1e-15), f"step {t}: ours {a}, torch {b}"


CASES = [
    ("StepLR", lambda: optim.step_decay(BASE, 7, 0.5), lambda o: L.StepLR(o, 7, 0.5), 60),
    ("MultiStepLR", lambda: optim.multistep_decay(BASE, [5, 12, 30], 0.3), lambda o: L.MultiStepLR(o, [5, 12, 30], 0.3), 50),
    ("ExponentialLR", lambda: optim.exponential_decay(BASE, 0.97), lambda o: L.ExponentialLR(o, 0.97), 100),
    ("PolynomialLR", lambda: optim.polynomial_decay(BASE, 40), lambda o: L.PolynomialLR(o, 40, 1.0), 60),
    ("PolynomialLR-p2", lambda: optim.polynomial_decay(BASE, 40, power=2.0),
     lambda o: L.PolynomialLR(o, 40, 2.0), 60),
    ("CosineAnnealingLR", lambda: optim.cosine_decay(BASE, 50, alpha=0.05),
     lambda o: L.CosineAnnealingLR(o, 50, eta_min=0.05 * BASE), 51),
    ("CosineAnnealingWarmRestarts", lambda: optim.cosine_restarts(BASE, 10, 1, alpha=0.1),
     lambda o: L.CosineAnnealingWarmRestarts(o, 10, 1, eta_min=0.1 * BASE), 55),
    ("CosineAnnealingWarmRestarts-mult2", lambda: optim.cosine_restarts(BASE, 5, 2),
     lambda o: L.CosineAnnealingWarmRestarts(o, 5, 2), 80),
    ("OneCycleLR", lambda: optim.one_cycle(BASE, 100), lambda o: L.OneCycleLR(o, BASE, total_steps=100,
                                                                            cycle_momentum=False), 100),
    ("OneCycleLR-linear-3phase", lambda: optim.one_cycle(BASE, 80, 0.25, "linear", 10.0, 100.0, True),
     lambda o: L.OneCycleLR(o, BASE, total_steps=80, pct_start=0.25, anneal_strategy="linear", div_factor=10.0,
                            final_div_factor=100.0, three_phase=True, cycle_momentum=False), 80),
    ("LinearLR+SequentialLR", lambda: optim.warmup(optim.cosine_decay(BASE, 40), 10, start_factor=0.2),
     lambda o: L.SequentialLR(o, [L.LinearLR(o, start_factor=0.2, total_iters=10), L.CosineAnnealingLR(o, 40)],
                              milestones=[10]), 50),
    ("LinearLR+SequentialLR-step", lambda: optim.warmup(optim.step_decay(BASE, 5, 0.5), 4, start_factor=0.5),
     lambda o: L.SequentialLR(o, [L.LinearLR(o, start_factor=0.5, total_iters=4), L.StepLR(o, 5, 0.5)],
                              milestones=[4]), 30),
]


@pytest.mark.parametrize("name,ours,theirs,steps", CASES, ids=[c[0] for c in CASES])
def test_schedule_matches_torch_scheduler(name, ours, theirs, steps):
    schedule = ours()
    assert_same([schedule(t) for t in range(steps)], torch_lrs(theirs, steps))


def test_one_cycle_momentum_matches_torch():
    mom = optim.one_cycle_momentum(60, pct_start=0.4, base_momentum=0.8, max_momentum=0.9)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE, momentum=0.9)
    sched = L.OneCycleLR(opt, BASE, total_steps=60, pct_start=0.4, base_momentum=0.8, max_momentum=0.9)
    for t in range(60):
        assert mom(t) == pytest.approx(opt.param_groups[0]["momentum"], rel=1e-12)
        opt.step()
        sched.step()


METRICS = [1.0, 0.9, 0.9, 0.91, 0.95, 0.8, 0.8, 0.8, 0.8, 0.79, 0.7, 0.71, 0.72, 0.73, 0.74, 0.75, 0.6, 0.6, 0.6,
           0.6, float("nan"), 0.6, 0.6]


@pytest.mark.parametrize("kwargs", [
    {},
    {"patience": 1, "factor": 0.5},
    {"patience": 0, "factor": 0.5, "cooldown": 2},
    {"patience": 1, "threshold": 0.05, "threshold_mode": "abs"},
    {"patience": 0, "factor": 0.3, "min_lr": 0.004},
    {"mode": "max", "patience": 1, "factor": 0.5},
    {"mode": "max", "patience": 0, "threshold": 0.01, "threshold_mode": "abs", "cooldown": 1},
])
def test_reduce_on_plateau_matches_torch(kwargs):
    ours = optim.ReduceOnPlateau(base_lr=BASE, **kwargs)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE)
    ref = L.ReduceLROnPlateau(opt, **kwargs)
    metrics = METRICS if kwargs.get("mode") != "max" else [-m for m in METRICS]
    for m in metrics:
        opt.step()
        ref.step(m)
        lr = ours.step(torch.tensor(m))
        assert lr == opt.param_groups[0]["lr"] and ours(123) == lr
    if not kwargs:
        assert ours.lr == BASE  # patience 10 never runs out on this sequence
    else:
        assert ours.lr < BASE


def test_reduce_on_plateau_resumes_identically():
    a = optim.ReduceOnPlateau(patience=1, factor=0.5, cooldown=1, base_lr=BASE)
    for m in METRICS[:9]:
        a.step(m)
    b = optim.ReduceOnPlateau(patience=1, factor=0.5, cooldown=1, base_lr=BASE)
    b.load_state_dict(pickle.loads(pickle.dumps(a.state_dict())))
    assert [a.step(m) for m in METRICS[9:]] == [b.step(m) for m in METRICS[9:]]
    with pytest.raises(ValueError, match="needs keys"):
        b.load_state_dict({"lr": 0.1})


def test_reduce_on_plateau_needs_a_number():
    plat = optim.ReduceOnPlateau(base_lr=BASE)
    with pytest.raises(ValueError, match="needs a number"):
        plat.step("low")
    with pytest.raises(ValueError, match="needs base_lr"):
        optim.ReduceOnPlateau()


def test_inverse_time_decay_formula():
    s = optim.inverse_time_decay(BASE, 0.5, decay_steps=10)
    assert [s(t) for t in (0, 10, 15)] == [BASE, BASE / 1.5, BASE / 1.75]
    stairs = optim.inverse_time_decay(BASE, 0.5, decay_steps=10, staircase=True)
    assert stairs(15) == BASE / 1.5 and stairs(20) == BASE / 2.0
    nested = optim.inverse_time_decay(optim.step_decay(BASE, 4, 0.5), 1.0)
    assert nested(4) == BASE * 0.5 / 5


def test_schedules_hold_their_final_value():
    assert optim.cosine_decay(BASE, 10, alpha=0.1)(10) == pytest.approx(0.01)
    assert optim.cosine_decay(BASE, 10, alpha=0.1)(500) == pytest.approx(0.01)
    cyc = optim.one_cycle(BASE, 50)
    assert cyc(49) == cyc(1000) == pytest.approx(BASE / 25 / 1e4)
    assert optim.polynomial_decay(BASE, 10, end_value=0.01)(99) == 0.01


def test_cosine_warmup_shape():
    s = optim.warmup(optim.constant_schedule(BASE), 10, kind="cosine")
    assert s(0) == 0.0 and s(5) == pytest.approx(BASE / 2) and s(10) == BASE
    values = [s(t) for t in range(11)]
    assert values == sorted(values)


def test_make_schedule_builds_each_name_and_warms_up():
    params = {"step": {"step_size": 3}, "multistep": {"milestones": [2, 4]}, "exponential": {"gamma": 0.9},
              "inverse_time": {"decay_rate": 0.1}, "polynomial": {"total_steps": 10}, "cosine": {"decay_steps": 10},
              "cosine_restarts": {"first_period": 4}, "one_cycle": {"total_steps": 10}}
    for name in optim.SCHEDULES:
        sched = optim.make_schedule(name, BASE, **params.get(name, {}))
        assert sched(0) == pytest.approx(BASE / 25 if name == "one_cycle" else BASE)
        warm = optim.make_schedule(name, BASE, warmup_steps=5, **params.get(name, {}))
        assert warm(0) == 0.0 and warm(5) == sched(0) and warm(7) == sched(2)
    assert repr(optim.make_schedule("cosine", BASE, decay_steps=10)) == \
        "cosine_decay(init_value=0.1, decay_steps=10, alpha=0.0)"


@pytest.mark.parametrize("call,match", [
    (lambda: optim.make_schedule("linear", BASE), "unknown schedule 'linear'; choose one of: constant, step"),
    (lambda: optim.make_schedule("step", BASE), "schedule 'step' needs step_size"),
    (lambda: optim.make_schedule("cosine", BASE, decay_steps=10, T_max=3), "does not take T_max"),
    (lambda: optim.make_schedule("cosine", -1.0, decay_steps=10), r"init_value must be >= 0, got -1\.0"),
    (lambda: optim.step_decay(BASE, 0), "step_size must be an integer >= 1, got 0"),
    (lambda: optim.multistep_decay(BASE, [5, 3]), "milestones must be increasing"),
    (lambda: optim.cosine_decay(BASE, 10, alpha=2.0), r"alpha must be in \[0, 1\], got 2\.0"),
    (lambda: optim.warmup(BASE, 10, kind="quadratic"), "kind must be one of 'linear', 'cosine', got 'quadratic'"),
    (lambda: optim.warmup(BASE, -2), "warmup_steps must be an integer >= 1, got -2"),
    (lambda: optim.one_cycle(BASE, 100, pct_start=1.5), r"pct_start must be in \(0, 1\), got 1\.5"),
    (lambda: optim.one_cycle(BASE, 3, pct_start=0.1), "leaves an empty phase"),
    (lambda: optim.ReduceOnPlateau(mode="lowest", base_lr=BASE), "mode must be one of 'min', 'max', got 'lowest'"),
    (lambda: optim.ReduceOnPlateau(factor=1.0, base_lr=BASE), r"factor must be in \(0, 1\), got 1\.0"),
    (lambda: optim.constant_schedule(BASE)(-1), "step must be a non-negative integer, got -1"),
    (lambda: optim.make_schedule("cosine", BASE, decay_steps=10, warmup_kind="cosine"), "need warmup_steps > 0"),
])
def test_schedule_errors_name_argument_and_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()
