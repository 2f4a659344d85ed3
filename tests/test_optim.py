"""Contract of the optimizer family: chain order, apply_updates, deferred updates, state saving and
bit-for-bit resume, describe/current_lr, registries, builders, error messages, and no host syncs."""

import io
import math
import pickle

import pytest
import torch

from convdescent import optim
from convdescent.optim import GradientTransformation, LazyUpdates

SHAPES = {"conv1.weight": (4, 2, 3, 3), "conv1.bias": (4,), "dense1.weight": (3, 8), "dense1.bias": (3,)}


def make_params(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in SHAPES.items()}


def grad_fn(params):
    """Closed-form gradient of ``sum 0.5 * (p - 0.3)^2 + 0.1 * sin(3p)``."""
    return {k: (p - 0.3) + 0.3 * torch.cos(3 * p) for k, p in params.items()}


def run(tx, params, state, steps):
    for _ in range(steps):
        updates, state = tx.update(grad_fn(params), state, params)
        optim.apply_updates(params, updates)
    return state


# ----- chain and apply ------------------------------------------------------------------------------------

def _affine(add, mul, log, tag):
    def init(params):
        return ()

    def update(grads, state, params=None):
        log.append(tag)
        return {k: (g + add) * mul for k, g in grads.items()}, state

    return GradientTransformation(init, update)


def test_chain_applies_transforms_in_order():
    log = []
    tx = optim.chain(_affine(1.0, 1.0, log, "a"), _affine(0.0, 3.0, log, "b"))
    grads = {"w": torch.tensor([1.0, 2.0])}
    updates, _ = tx.update(grads, tx.init(grads), None)
    assert log == ["a", "b"]
    assert torch.equal(updates["w"], torch.tensor([6.0, 9.0]))  # (g + 1) * 3, not g * 3 + 1
    reversed_tx = optim.chain(_affine(0.0, 3.0, log, "b"), _affine(1.0, 1.0, log, "a"))
    updates, _ = reversed_tx.update({"w": torch.tensor([1.0, 2.0])}, reversed_tx.init(grads), None)
    assert torch.equal(updates["w"], torch.tensor([4.0, 7.0]))


def test_chain_flattens_nested_chains_and_states():
    inner = optim.chain(optim.clip_by_global_norm(1.0), optim.scale_by_adam())
    tx = optim.chain(inner, optim.scale_by_learning_rate(0.1))
    assert len(tx.info.children) == 3
    assert len(tx.init(make_params())) == 3


def test_chain_rejects_non_transforms():
    with pytest.raises(ValueError, match="chain argument 1"):
        optim.chain(optim.identity(), "adam")


def test_minus_sign_lives_in_scale_by_learning_rate():
    params = make_params()
    grads = {k: torch.ones_like(p) for k, p in params.items()}
    updates, _ = optim.scale_by_adam().update(dict(grads), optim.scale_by_adam().init(params), params)
    assert all((u > 0).all() for u in updates.values())
    updates, _ = optim.scale_by_learning_rate(0.5).update(dict(grads), optim.scale_by_learning_rate(0.5).init(params))
    assert all(torch.equal(u, torch.full_like(u, -0.5)) for u in updates.values())


def test_apply_updates_in_place_and_returns_none():
    params = {"w": torch.zeros(3)}
    same = params["w"]
    assert optim.apply_updates(params, {"w": torch.ones(3)}) is None
    assert params["w"] is same and torch.equal(same, torch.ones(3))


def test_apply_updates_rejects_mismatched_keys():
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        optim.apply_updates({"w": torch.zeros(1), "b": torch.zeros(1)}, {"w": torch.zeros(1)})


def test_gd_is_the_tutorial_update():
    params = make_params()
    before = {k: v.clone() for k, v in params.items()}
    grads = grad_fn(params)
    expected = {k: before[k] - 0.1 * grads[k] for k in params}
    tx = optim.gd(lr=0.1)
    updates, _ = tx.update({k: g.clone() for k, g in grads.items()}, tx.init(params), params)
    optim.apply_updates(params, updates)
    for k in params:
        torch.testing.assert_close(params[k], expected[k], rtol=1e-6, atol=1e-7)


# ----- deferred updates ---------------------------------------------------------------------------------

def _adamw_updates(params):
    tx = optim.adamw(lr=0.01, weight_decay=0.1)
    state = tx.init(params)
    updates, state = tx.update(grad_fn(params), state, params)
    return tx, state, updates


def test_lazy_updates_read_equals_what_apply_adds():
    p1, p2 = make_params(), make_params()
    _, _, u1 = _adamw_updates(p1)
    _, _, u2 = _adamw_updates(p2)
    assert isinstance(u1, LazyUpdates) and u1.pending
    read = dict(u1)  # evaluates
    assert not u1.pending
    before = {k: v.clone() for k, v in p2.items()}
    optim.apply_updates(p2, u2)  # fused path
    for k in p2:
        torch.testing.assert_close(p2[k] - before[k], read[k], rtol=1e-5, atol=1e-7)
    optim.apply_updates(p1, u1)  # read first: the same term-by-term addition follows
    assert all(torch.equal(p1[k], p2[k]) for k in p1)


@pytest.mark.parametrize("name", ["gd", "sgd", "rmsprop", "adam", "adamw", "nadam", "radam", "adamax", "lion"])
def test_reading_updates_never_changes_the_run(name):
    tx = optim.make_optimizer(name, lr=0.01, **({"momentum": 0.9} if name == "sgd" else {}))
    p1, p2 = make_params(), make_params()
    s1, s2 = tx.init(p1), tx.init(p2)
    for _ in range(10):
        u1, s1 = tx.update(grad_fn(p1), s1, p1)
        optim.apply_updates(p1, u1)
        u2, s2 = tx.update(grad_fn(p2), s2, p2)
        norm = optim.global_norm(list(u2.values()))  # a monitor reads them before they are applied
        optim.apply_updates(p2, u2)
        assert torch.isfinite(norm) and dict(u2)  # still readable after apply, having been read before
    assert all(torch.equal(p1[k], p2[k]) for k in p1)


def test_modified_updates_are_applied_as_modified():
    params = make_params()
    _, _, u = _adamw_updates(params)
    before = {k: v.clone() for k, v in params.items()}
    u["conv1.bias"] = torch.zeros(4)
    u["dense1.bias"].mul_(2.0)
    expected = {k: v.clone() for k, v in u.items()}
    optim.apply_updates(params, u)
    for k in params:
        torch.testing.assert_close(params[k] - before[k], expected[k], rtol=1e-5, atol=1e-7)
    assert torch.equal(params["conv1.bias"], before["conv1.bias"])


def test_lazy_updates_behave_as_a_dict():
    params = make_params()
    _, _, u = _adamw_updates(params)
    assert list(u) == list(SHAPES) and len(u) == 4 and "conv1.bias" in u
    as_dict = {**u}
    assert all(isinstance(v, torch.Tensor) and v.shape == params[k].shape for k, v in as_dict.items())
    assert u == as_dict and u.copy() == as_dict and dict(u.items()) == as_dict
    assert u.get("nope") is None and torch.equal(u.get("conv1.bias"), as_dict["conv1.bias"])
    buf = io.BytesIO()
    torch.save(u, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is dict and all(torch.equal(loaded[k], as_dict[k]) for k in as_dict)
    assert type(pickle.loads(pickle.dumps(u))) is dict


def test_lazy_updates_refuse_reads_after_apply():
    params = make_params()
    _, _, u = _adamw_updates(params)
    optim.apply_updates(params, u)
    with pytest.raises(RuntimeError, match="before calling apply_updates"):
        u["conv1.weight"]
    with pytest.raises(RuntimeError):
        dict(u)


def test_lazy_updates_refuse_reads_after_state_moved():
    params = make_params()
    tx, state, u = _adamw_updates(params)
    tx.update(grad_fn(params), state, params)  # mutates the moments u refers to
    with pytest.raises(RuntimeError, match="later update"):
        list(u.values())


def test_lazy_placeholders_never_leak():
    params = make_params()
    _, _, u = _adamw_updates(params)
    assert "pending" in repr(u)
    values = list({**u}.values())
    assert all(isinstance(v, torch.Tensor) for v in values)


# ----- state saving and resume ----------------------------------------------------------------------------

RESUME_CASES = [
    ("gd", {"lr": 0.05}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "dampening": 0.2}),
    ("rmsprop", {"lr": 0.01, "momentum": 0.5, "centered": True}),
    ("adagrad", {"lr": 0.1, "lr_decay": 0.01}),
    ("adadelta", {}),
    ("adam", {"lr": 0.01, "amsgrad": True}),
    ("adamw", {"lr": 0.01}),
    ("nadam", {"lr": 0.01}),
    ("radam", {"lr": 0.01, "weight_decay": 0.01, "decoupled_weight_decay": True}),
    ("adamax", {"lr": 0.01}),
    ("lion", {"lr": 0.001, "weight_decay": 0.1}),
]


def _build(name, hp, plateau=False):
    schedule = optim.make_schedule("reduce_on_plateau", hp.get("lr", 1e-2), patience=0, factor=0.5) if plateau \
        else optim.warmup(optim.cosine_decay(hp.get("lr", 1e-2), 40), 5)
    hp = {**hp, "lr": schedule}
    return optim.make_optimizer(name, clip_norm=0.5, agc=0.05, record=True, **hp)


@pytest.mark.parametrize("plateau", [False, True], ids=["cosine", "plateau"])
@pytest.mark.parametrize("name,hp", RESUME_CASES, ids=[c[0] + str(i) for i, c in enumerate(RESUME_CASES)])
def test_interrupted_run_resumes_bit_for_bit(name, hp, plateau):
    metrics = [1.0, 0.9, 0.95, 0.97, 0.99, 1.2]

    def epoch(tx, params, state, i):
        state = run(tx, params, state, 4)
        plat = optim.find_plateau(tx)
        if plat is not None:
            plat.step(metrics[i])
        return state

    # Uninterrupted: 6 epochs.
    tx = _build(name, hp, plateau)
    params = make_params()
    state = tx.init(params)
    for i in range(6):
        state = epoch(tx, params, state, i)
    # Interrupted after 3 epochs, saved through torch.save, resumed in a fresh optimizer object.
    tx_a = _build(name, hp, plateau)
    params_a = make_params()
    state_a = tx_a.init(params_a)
    for i in range(3):
        state_a = epoch(tx_a, params_a, state_a, i)
    buf = io.BytesIO()
    torch.save({"params": params_a, "opt": optim.state_dict(state_a)}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    tx_b = _build(name, hp, plateau)
    params_b = {k: v.clone() for k, v in saved["params"].items()}
    state_b = optim.load_state_dict(tx_b.init(params_b), saved["opt"])
    for i in range(3, 6):
        state_b = epoch(tx_b, params_b, state_b, i)
    for k in params:
        assert torch.equal(params[k], params_b[k]), k
    assert optim.current_lr(tx, state) == optim.current_lr(tx_b, state_b)
    if plateau:
        assert optim.find_plateau(tx_b).lr < hp.get("lr", 1e-2)  # the metric did cut the rate


def test_state_dict_is_plain_and_cloned():
    params = make_params()
    tx = optim.make_optimizer("adam", lr=0.01)
    state = run(tx, params, tx.init(params), 3)
    saved = optim.state_dict(state)

    def check(x):
        if isinstance(x, dict):
            for v in x.values():
                check(v)
        else:
            assert isinstance(x, (torch.Tensor, int, float, bool, str, type(None)))

    check(saved)
    assert saved["0"]["count"] == 3
    mu = saved["0"]["mu"]["conv1.weight"]
    run(tx, params, state, 1)
    assert not torch.equal(mu, state[0].mu["conv1.weight"])  # a snapshot, not a view


def test_load_state_dict_names_the_mismatch():
    params = make_params()
    adam = optim.make_optimizer("adam")
    saved = optim.state_dict(adam.init(params))
    with pytest.raises(ValueError, match="keys"):
        optim.load_state_dict(optim.make_optimizer("sgd", momentum=0.9).init(params), saved)
    other = {k: torch.zeros(2) for k in params}
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        optim.load_state_dict(adam.init(params), optim.state_dict(adam.init(other)))


def test_plateau_state_round_trips():
    plat = optim.ReduceOnPlateau(patience=1, base_lr=0.1, cooldown=1)
    for m in [1.0, 1.0, 1.0, 0.5, 0.6]:
        plat.step(m)
    copy = optim.ReduceOnPlateau(patience=1, base_lr=0.1, cooldown=1)
    copy.load_state_dict(pickle.loads(pickle.dumps(plat.state_dict())))
    for m in [0.7, 0.8, 0.9, 1.0]:
        assert plat.step(m) == copy.step(m)
    assert plat.scale == copy.scale < 1.0


# ----- describe, current_lr, registry ---------------------------------------------------------------------

def test_describe_reads_as_a_chain():
    tx = optim.make_optimizer("adam", lr=1e-3, clip_norm=1.0)
    assert optim.describe(tx) == ("chain(clip_by_global_norm(max_norm=1.0), scale_by_adam(b1=0.9, b2=0.999, "
                                  "eps=1e-08), scale_by_learning_rate(0.001))")
    tx = optim.adamw(lr=optim.cosine_decay(0.1, 100))
    assert optim.describe(tx) == ("chain(scale_by_adam(b1=0.9, b2=0.999, eps=1e-08), decoupled_weight_decay("
                                  "weight_decay=0.01), scale_by_learning_rate(cosine_decay(init_value=0.1, "
                                  "decay_steps=100, alpha=0.0)))")
    rec = optim.make_optimizer("sgd", momentum=0.9, record=True)
    assert optim.describe(rec).startswith("record_norms(chain(trace(decay=0.9")


def test_current_lr_follows_schedule_and_plateau():
    sched = optim.step_decay(0.1, step_size=2, gamma=0.5)
    tx = optim.sgd(lr=sched)
    params = make_params()
    state = tx.init(params)
    for t in range(5):
        assert optim.current_lr(tx, state) == sched(t)
        state = run(tx, params, state, 1)
    plat_tx = optim.make_optimizer("adam", lr=optim.make_schedule("reduce_on_plateau", 0.01, patience=0))
    st = plat_tx.init(params)
    optim.find_plateau(plat_tx).step(1.0)
    optim.find_plateau(plat_tx).step(2.0)
    assert optim.current_lr(plat_tx, st) == pytest.approx(0.001)
    with pytest.raises(ValueError, match="no scale_by_learning_rate"):
        optim.current_lr(optim.scale_by_adam(), ())
    assert optim.find_plateau(tx) is None


def test_registry_defaults_follow_torch_optim():
    counterparts = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adagrad": torch.optim.Adagrad,
                    "adadelta": torch.optim.Adadelta, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
                    "nadam": torch.optim.NAdam}
    assert set(optim.OPTIMIZERS) == {"gd", "sgd", "rmsprop", "adagrad", "adadelta", "adam", "adamw", "nadam", "radam",
                                     "adamax", "lion"}
    for name, cls in counterparts.items():
        torch_defaults = cls([torch.nn.Parameter(torch.zeros(1))]).defaults
        ours = optim.OPTIMIZERS[name].defaults
        shared = set(ours) & set(torch_defaults)
        assert shared >= {"lr", "weight_decay", "maximize"}
        for key in shared:
            assert ours[key] == torch_defaults[key], (name, key)
    for entry in optim.OPTIMIZERS.values():
        assert isinstance(entry.builder(), GradientTransformation) and entry.description


def test_list_optimizers_text_lists_everything():
    text = optim.list_optimizers_text()
    for name in list(optim.OPTIMIZERS) + list(optim.SCHEDULES):
        assert f"\n{name} " in text
    assert "betas=(0.9, 0.999)" in text


def test_make_optimizer_and_named_builder_agree():
    p1, p2 = make_params(), make_params()
    a = optim.make_optimizer("rmsprop", lr=0.01, momentum=0.5)
    b = optim.rmsprop(lr=0.01, momentum=0.5)
    run(a, p1, a.init(p1), 5)
    run(b, p2, b.init(p2), 5)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)


def test_optimizer_from_args_builds_the_full_chain():
    tx = optim.optimizer_from_args("sgd", 0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, clip_norm=1.0,
                                   clip_value=5.0, agc=0.01, schedule="cosine", total_steps=1000,
                                   schedule_params={"warmup_epochs": 2}, steps_per_epoch=50)
    text = optim.describe(tx)
    assert text.startswith("record_norms(chain(clip_by_value(clip_value=5.0), adaptive_grad_clip(clipping=0.01")
    assert "clip_by_global_norm(max_norm=1.0), coupled_weight_decay(weight_decay=0.0001), trace(decay=0.9" in text
    assert "warmup(schedule=cosine_decay(init_value=0.1, decay_steps=900, alpha=0.0), warmup_steps=100" in text
    step_tx = optim.optimizer_from_args("adam", 1e-3, schedule="step", steps_per_epoch=10,
                                        schedule_params={"step_size_epochs": 3}, record=False)
    assert "step_decay(init_value=0.001, step_size=30, gamma=0.1)" in optim.describe(step_tx)
    multi = optim.optimizer_from_args("adam", 1e-3, schedule="multistep", steps_per_epoch=10,
                                      schedule_params={"milestones_epochs": [2, 5]})
    assert "milestones=(20, 50)" in optim.describe(multi)
    plat = optim.optimizer_from_args("adamw", 1e-3, schedule="reduce_on_plateau", schedule_params={"patience": 2})
    assert optim.find_plateau(plat).patience == 2


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "adam", "lr": 1e-3, "momentum": 0.9}, "momentum=0.9 does not apply to adam; it applies to sgd, rmsprop"),
    ({"name": "sgd", "lr": 1e-3, "betas": (0.9, 0.99)}, "betas=.* does not apply to sgd"),
    ({"name": "adamx", "lr": 1e-3}, "unknown optimizer 'adamx'"),
    ({"name": "adam", "lr": 1e-3, "schedule": "cosinus"}, "unknown schedule 'cosinus'"),
    ({"name": "adam", "lr": 1e-3, "schedule": "cosine"}, "needs decay_steps"),
    ({"name": "adam", "lr": 1e-3, "schedule": "step", "schedule_params": {"step_size_epochs": 2}},
     "steps_per_epoch is needed"),
    ({"name": "adam", "lr": -1.0}, "lr=-1.0 is out of range: lr must be >= 0"),
    ({"name": "adam", "lr": 1e-3, "clip_norm": 0.0}, "clip_norm=0.0 is out of range: clip_norm must be > 0"),
    ({"name": "gd", "lr": 1e-3, "schedule": "one_cycle", "total_steps": 100,
      "schedule_params": {"cycle_momentum": True}}, "cycle_momentum=True needs an optimizer"),
])
def test_optimizer_from_args_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.optimizer_from_args(**kwargs)


# ----- bad hyperparameters ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(optim.OPTIMIZERS))
def test_negative_learning_rate_is_refused(name):
    with pytest.raises(ValueError, match=r"lr must be >= 0, got -0\.1"):
        optim.make_optimizer(name, lr=-0.1)


@pytest.mark.parametrize("name", ["adam", "adamw", "nadam", "radam", "adamax", "lion"])
@pytest.mark.parametrize("betas", [(1.0, 0.999), (0.9, -0.1), (0.9,), "0.9"])
def test_betas_outside_unit_interval_are_refused(name, betas):
    with pytest.raises(ValueError, match=r"betas must be a pair of numbers in \[0, 1\), got " + repr(betas)[:3].replace("(", r"\(")):
        optim.make_optimizer(name, betas=betas)


@pytest.mark.parametrize("name", ["rmsprop", "adagrad", "adadelta", "adam", "adamw", "nadam", "radam", "adamax"])
@pytest.mark.parametrize("eps", [0.0, -1e-8])
def test_non_positive_eps_is_refused(name, eps):
    with pytest.raises(ValueError, match=f"eps must be > 0, got {eps!r}"):
        optim.make_optimizer(name, eps=eps)


@pytest.mark.parametrize("call,match", [
    (lambda: optim.make_optimizer("adamx"), "unknown optimizer 'adamx'; choose one of: gd, sgd"),
    (lambda: optim.make_optimizer("adam", momentum=0.9), "adam does not take momentum"),
    (lambda: optim.sgd(nesterov=True), "nesterov=True needs momentum > 0"),
    (lambda: optim.sgd(momentum=0.9, nesterov=True, dampening=0.1), "dampening == 0"),
    (lambda: optim.sgd(momentum=-0.5), r"momentum must be in \[0, 1\), got -0\.5"),
        (lambda: optim.sgd(momentum=1.0), r"momentum must be in \[0, 1\), got 1\.0"),
    (lambda: optim.sgd(weight_decay=-1), "weight_decay must be >= 0, got -1"),
    (lambda: optim.rmsprop(alpha=1.5), r"alpha must be in \[0, 1\), got 1\.5"),
    (lambda: optim.adadelta(rho=2.0), r"rho must be in \[0, 1\], got 2\.0"),
    (lambda: optim.adam(amsgrad="yes"), "amsgrad must be True or False, got 'yes'"),
    (lambda: optim.adam(lr="fast"), "lr must be a finite number, got 'fast'"),
    (lambda: optim.adam(lr=float("nan")), "lr must be a finite number, got nan"),
    (lambda: optim.make_schedule("cosinus", 0.1), "unknown schedule 'cosinus'"),
    (lambda: optim.clip_by_global_norm(-1.0), r"max_norm must be > 0, got -1\.0"),
    (lambda: optim.clip_by_value(0), "clip_value must be > 0, got 0"),
    (lambda: optim.adaptive_grad_clip(clipping=0.0), "clipping must be > 0, got 0.0"),
])
def test_bad_arguments_name_argument_and_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_schedule_giving_negative_lr_fails_at_that_step():
    tx = optim.gd(lr=lambda t: 0.1 - 0.05 * t)
    params = make_params()
    state = run(tx, params, tx.init(params), 3)
    with pytest.raises(ValueError, match=r"gave -0\.05.* at step 3"):
        run(tx, params, state, 1)


def test_update_without_params_names_the_need():
    tx = optim.adamw()
    params = make_params()
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(grad_fn(params), tx.init(params))


def test_state_built_for_other_params_is_reported():
    tx = optim.adam()
    state = tx.init({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="state was built for"):
        tx.update({"v": torch.zeros(2)}, state, {"v": torch.zeros(2)})


# ----- no host syncs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(optim.OPTIMIZERS))
def test_update_never_reads_values_back(name, monkeypatch):
    tx = optim.make_optimizer(name, clip_norm=1.0, clip_value=2.0, agc=0.1, record=True,
                              lr=optim.warmup(optim.cosine_decay(1e-2, 100), 3))
    params = make_params()
    state = run(tx, params, tx.init(params), 2)

    def refuse(*args, **kwargs):
        raise AssertionError("host sync inside update")

    for attr in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, attr, refuse)
    for _ in range(3):
        updates, state = tx.update(grad_fn(params), state, params)
        optim.apply_updates(params, updates)
    monkeypatch.undo()
    assert int(optim.optimizer_stats(state)["steps"]) == 5


def test_step_counters_are_python_ints():
    tx = optim.make_optimizer("adam")
    params = make_params()
    state = run(tx, params, tx.init(params), 2)
    assert type(state[0].count) is int and type(state[1].count) is int


def test_empty_parameter_dict_is_fine():
    tx = optim.make_optimizer("adam", clip_norm=1.0, record=True)
    state = tx.init({})
    updates, state = tx.update({}, state, {})
    optim.apply_updates({}, updates)
    assert dict(updates) == {}


def test_float64_parameters_keep_their_dtype():
    params = make_params(dtype=torch.float64)
    tx = optim.make_optimizer("nadam")
    state = run(tx, params, tx.init(params), 2)
    assert all(v.dtype == torch.float64 for v in state[0].mu.values())
    assert all(v.dtype == torch.float64 for v in params.values())
    assert math.isfinite(state[0].mu_product)


BLOCKS = {
    "scale": lambda: optim.scale(-2.0),
    "scale_by_learning_rate": lambda: optim.scale_by_learning_rate(optim.warmup(0.1, 3)),
    "trace": lambda: optim.trace(0.9, dampening=0.1),
    "trace_scheduled": lambda: optim.trace(optim.one_cycle_momentum(20)),
    "coupled_weight_decay": lambda: optim.coupled_weight_decay(0.1),
    "decoupled_weight_decay": lambda: optim.decoupled_weight_decay(0.1),
    "scale_by_rms": lambda: optim.scale_by_rms(centered=True),
    "scale_by_adagrad": lambda: optim.scale_by_adagrad(initial_accumulator_value=0.1),
    "scale_by_adadelta": lambda: optim.scale_by_adadelta(),
    "scale_by_adam": lambda: optim.scale_by_adam(amsgrad=True),
    "scale_by_nadam": lambda: optim.scale_by_nadam(),
    "scale_by_lion": lambda: optim.scale_by_lion(),
    "clip_by_value": lambda: optim.clip_by_value(0.1),
    "clip_by_global_norm": lambda: optim.clip_by_global_norm(0.1),
    "clip_by_norm": lambda: optim.clip_by_norm(0.1),
    "adaptive_grad_clip": lambda: optim.adaptive_grad_clip(0.01),
    "record_norms": lambda: optim.record_norms(optim.chain(optim.clip_by_norm(0.1), optim.trace(0.5))),
    "identity": lambda: optim.identity(),
}


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("name", list(BLOCKS))
def test_every_block_state_round_trips(name):
    block = BLOCKS[name]
    tx = optim.chain(block(), optim.scale_by_learning_rate(0.01))
    params = make_params()
    state = run(tx, params, tx.init(params), 3)
    saved = optim.state_dict(state)
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    restored = optim.load_state_dict(optim.chain(block(), optim.scale_by_learning_rate(0.01)).init(params),
                                     torch.load(buf))
    assert _same(optim.state_dict(restored), saved)
    assert type(restored[0]) is type(state[0])
    p_a, p_b = {k: v.clone() for k, v in params.items()}, {k: v.clone() for k, v in params.items()}
    run(tx, p_a, state, 2)
    run(tx, p_b, restored, 2)
    assert all(torch.equal(p_a[k], p_b[k]) for k in params)
