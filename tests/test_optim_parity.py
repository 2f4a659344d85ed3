"""Each named optimizer follows its torch.optim counterpart over 300 steps (float64 and float32);
Lion follows its paper's update written out here."""

import pytest
import torch

from convdescent import optim

SHAPES = {"conv1.weight": (4, 2, 3, 3), "conv1.bias": (4,), "dense1.weight": (3, 8), "dense1.bias": (3,)}
STEPS = 300


@pytest.fixture
def default_dtype():
    """Set torch's default dtype for the test (torch keeps NAdam's mu_product in it) and restore it."""
    saved = torch.get_default_dtype()

    def use(dtype):
        torch.set_default_dtype(dtype)

    yield use
    torch.set_default_dtype(saved)


class Problem:
    """A random non-convex objective whose gradient is written in closed form:
    ``L(p) = sum_k 0.5 * h_k * (p_k - t_k)^2 + 0.1 * sin(3 p_k)`` elementwise."""

    def __init__(self, dtype, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.init = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in SHAPES.items()}
        self.h = {k: (torch.rand(s, generator=gen, dtype=dtype) + 0.5) for k, s in SHAPES.items()}
        self.t = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in SHAPES.items()}

    def grad(self, params):
        return {k: self.h[k] * (p - self.t[k]) + 0.3 * torch.cos(3 * p) for k, p in params.items()}

    def run_ours(self, opt, steps=STEPS):
        params = {k: v.clone() for k, v in self.init.items()}
        state = opt.init(params)
        for _ in range(steps):
            updates, state = opt.update(self.grad(params), state, params)
            optim.apply_updates(params, updates)
        return params

    def run_torch(self, cls, hp, steps=STEPS, scheduler=None):
        tensors = [torch.nn.Parameter(v.clone()) for v in self.init.values()]
        opt = cls(tensors, **hp)
        sched = scheduler(opt) if scheduler else None
        for _ in range(steps):
            grads = self.grad({k: t.detach() for k, t in zip(self.init, tensors)})
            for t, k in zip(tensors, self.init):
                t.grad = grads[k]
            opt.step()
            if sched is not None:
                sched.step()
        return {k: t.detach() for k, t in zip(self.init, tensors)}


def rel_error(ours, ref):
    return max(((ours[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref)


TORCH_CASES = [
    ("gd", torch.optim.SGD, {"lr": 0.05}),
    ("sgd", torch.optim.SGD, {"lr": 0.05}),
    ("sgd", torch.optim.SGD, {"lr": 0.02, "momentum": 0.9}),
    ("sgd", torch.optim.SGD, {"lr": 0.02, "momentum": 0.9, "dampening": 0.3}),
    ("sgd", torch.optim.SGD, {"lr": 0.02, "momentum": 0.9, "nesterov": True}),
    ("sgd", torch.optim.SGD, {"lr": 0.02, "momentum": 0.8, "weight_decay": 0.05}),
    ("sgd", torch.optim.SGD, {"lr": 0.02, "momentum": 0.8, "nesterov": True, "weight_decay": 0.05, "maximize": True}),
    ("rmsprop", torch.optim.RMSprop, {"lr": 0.01}),
    ("rmsprop", torch.optim.RMSprop, {"lr": 0.01, "centered": True}),
    ("rmsprop", torch.optim.RMSprop, {"lr": 0.005, "momentum": 0.7}),
    ("rmsprop", torch.optim.RMSprop, {"lr": 0.005, "momentum": 0.7, "centered": True, "weight_decay": 0.05,
                                      "alpha": 0.9, "eps": 1e-6}),
    ("adagrad", torch.optim.Adagrad, {"lr": 0.1}),
    ("adagrad", torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.05,
                                      "initial_accumulator_value": 0.1}),
    ("adadelta", torch.optim.Adadelta, {"lr": 1.0}),
    ("adadelta", torch.optim.Adadelta, {"lr": 0.5, "rho": 0.8, "weight_decay": 0.05}),
    ("adam", torch.optim.Adam, {"lr": 0.01}),
    ("adam", torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
    ("adam", torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.05, "betas": (0.8, 0.99), "eps": 1e-6}),
    ("adam", torch.optim.Adam, {"lr": 0.01, "maximize": True, "amsgrad": True}),
    ("adamw", torch.optim.AdamW, {"lr": 0.01}),
    ("adamw", torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    ("nadam", torch.optim.NAdam, {"lr": 0.01}),
    ("nadam", torch.optim.NAdam, {"lr": 0.01, "weight_decay": 0.05, "momentum_decay": 0.01}),
    ("nadam", torch.optim.NAdam, {"lr": 0.01, "weight_decay": 0.05, "decoupled_weight_decay": True}),
    ("radam", torch.optim.RAdam, {"lr": 0.01}),
    ("radam", torch.optim.RAdam, {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05}),
    ("radam", torch.optim.RAdam, {"lr": 0.01, "weight_decay": 0.05, "decoupled_weight_decay": True}),
    ("radam", torch.optim.RAdam, {"lr": 0.01, "maximize": True}),
    ("adamax", torch.optim.Adamax, {"lr": 0.01}),
    ("adamax", torch.optim.Adamax, {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05}),
    ("adamax", torch.optim.Adamax, {"lr": 0.01, "maximize": True}),
]


def _case_id(case):
    name, _, hp = case
    return name + "-" + "-".join(f"{k}={v}" for k, v in hp.items())


@pytest.mark.parametrize("case", TORCH_CASES, ids=[_case_id(c) for c in TORCH_CASES])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["float64", "float32"])
def test_matches_torch_optim(case, dtype, tol, default_dtype):
    default_dtype(dtype)
    name, cls, hp = case
    problem = Problem(dtype)
    ours = problem.run_ours(optim.make_optimizer(name, **hp))
    ref = problem.run_torch(cls, hp)
    start = problem.init
    # The run must actually move the parameters, or agreement would prove nothing.
    assert min((ref[k] - start[k]).norm().item() for k in ref) > 1e-2
    assert rel_error(ours, ref) <= tol


def lion_reference(problem, lr, b1, b2, wd, steps=STEPS):
    """Lion exactly as Algorithm 2 of Chen et al. (2023), one tensor at a time."""
    params = {k: v.clone() for k, v in problem.init.items()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    for _ in range(steps):
        grads = problem.grad(params)
        for k in params:
            c = b1 * m[k] + (1 - b1) * grads[k]
            params[k] = params[k] - lr * (torch.sign(c) + wd * params[k])
            m[k] = b2 * m[k] + (1 - b2) * grads[k]
    return params


@pytest.mark.parametrize("wd", [0.0, 0.5])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["float64", "float32"])
def test_lion_matches_paper(wd, dtype, tol):
    problem = Problem(dtype, seed=3)
    ours = problem.run_ours(optim.lion(lr=3e-3, betas=(0.9, 0.99), weight_decay=wd))
    ref = lion_reference(problem, 3e-3, 0.9, 0.99, wd)
    assert min((ref[k] - problem.init[k]).norm().item() for k in ref) > 1e-2
    assert rel_error(ours, ref) <= tol


@pytest.mark.parametrize("name,cls,hp", [
    ("sgd", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    ("adam", torch.optim.Adam, {"lr": 0.02}),
])
def test_scheduled_lr_matches_torch_scheduler(name, cls, hp, default_dtype):
    default_dtype(torch.float64)
    problem = Problem(torch.float64, seed=1)
    sched = optim.cosine_decay(hp["lr"], STEPS, alpha=0.1)
    ours = problem.run_ours(optim.make_optimizer(name, **{**hp, "lr": sched}))
    ref = problem.run_torch(cls, hp, scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(
        o, T_max=STEPS, eta_min=0.1 * hp["lr"]))
    assert rel_error(ours, ref) <= 1e-10


@pytest.mark.parametrize("name,cls,hp", [
    ("sgd", torch.optim.SGD, {"momentum": 0.9}),
    ("adam", torch.optim.Adam, {}),
])
def test_one_cycle_with_momentum_cycling_matches_torch(name, cls, hp, default_dtype):
    default_dtype(torch.float64)
    problem = Problem(torch.float64, seed=2)
    # torch's OneCycleLR refuses a scheduler.step() past total_steps, and the loop steps it after each of
    # the STEPS updates, so both sides use a cycle of STEPS + 1 steps.
    tx = optim.optimizer_from_args(name, 0.05, schedule="one_cycle", total_steps=STEPS + 1,
                                   schedule_params={"cycle_momentum": True}, record=False)
    ours = problem.run_ours(tx)
    ref = problem.run_torch(cls, {"lr": 0.05, **hp}, scheduler=lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.05, total_steps=STEPS + 1))
    assert rel_error(ours, ref) <= 1e-10
