"""The gradient-health monitor: its figures against direct computation, each rule firing when it should (and
not when it should not), the flags on deep sigmoid networks and huge learning rates, and its records in a run
directory's metrics.jsonl and report.html."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from convdescent import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, Sigmoid, SoftmaxCrossEntropy, native
from convdescent.data.synthetic import synthetic_images, write_npz_dataset
from convdescent.diagnostics.health import (ActivationProbe, ClipSpec, HealthMonitor, HealthRules, clip_specs,
                                            clipped_fractions, health_records)
from convdescent.optim import make_optimizer
from convdescent.train import Callback, fit


# one torch thread: on the shared 2-core machine two threads ran these small problems many times slower
pytestmark = pytest.mark.usefixtures("one_thread")


def small_cnn(seed=0):
    return Sequential([Conv2D(4, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(16), ReLU(), Dense(3)],
                      input_shape=(1, 8, 8), seed=seed)


def deep_sigmoid(depth=12, seed=0):
    layers = [Flatten()]
    for _ in range(depth):
        layers += [Dense(32), Sigmoid()]
    return Sequential(layers + [Dense(3)], input_shape=(1, 8, 8), seed=seed)


DATA = synthetic_images(256, 3, (1, 8, 8), seed=0)


def train(model, opt, monitor, steps=None, epochs=1, extra=(), batch_size=32, data=DATA):
    fit(model, SoftmaxCrossEntropy(), opt, data, epochs=None if steps else epochs, steps=steps,
        batch_size=batch_size, callbacks=[monitor, *extra], verbose=0, handle_signals=False)
    return monitor


class Spy(Callback):
    """Keeps copies of the gradients and weights the monitor sees, on the same steps."""

    def __init__(self, every):
        self.every = every
        self.grads, self.before, self.after, self.losses = {}, {}, {}, {}

    def wants_grads(self, step):
        return step % self.every == 0

    def on_gradients(self, trainer, step, grads, params):
        self.grads[step] = {k: g.clone() for k, g in grads.items()}
        self.before[step] = {k: p.clone() for k, p in params.items()}

    def on_step_end(self, trainer, step, logs):
        self.losses[step] = (logs["epoch"], float(logs["loss"]))
        if step % self.every == 0:
            self.after[step] = {k: p.clone() for k, p in trainer.model.params().items()}


def test_figures_match_direct_computation():
    spy = Spy(every=3)
    mon = train(small_cnn(), make_optimizer("adam", lr=1e-2), HealthMonitor(every=3, stream=None), steps=9,
                extra=[spy])
    assert [r["step"] for r in mon.records] == [3, 6, 9]  # steps count from 1, multiples of every
    for rec in mon.records:
        s = rec["step"]
        total = 0.0
        for name, st in rec["params"].items():
            g = spy.grads[s][name].double()
            total += float(g.norm()) ** 2
            assert st["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-5)
            assert st["grad_max"] == pytest.approx(float(g.abs().max()), rel=1e-6)
            assert st["grad_min"] == pytest.approx(float(g.abs().min()), rel=1e-6, abs=1e-30)
            w0, w1 = spy.before[s][name].double(), spy.after[s][name].double()
            assert st["weight_norm"] == pytest.approx(float(w0.norm()), rel=1e-5)
            assert st["update_norm"] == pytest.approx(float((w1 - w0).norm()), rel=1e-4)
            if float(w0.norm()) > 0:
                assert st["update_ratio"] == pytest.approx(float((w1 - w0).norm() / w0.norm()), rel=1e-4)
            else:  # zero-initialized biases: the ratio is undefined, not infinite
                assert st["update_ratio"] is None
            assert st["clip_frac"] == 0.0
        assert rec["grad_norm"] == pytest.approx(math.sqrt(total), rel=1e-5)
        assert set(rec["layers"]) == {"conv1", "relu1", "dense1", "relu2", "dense2"}
        assert rec["layers"]["relu1"]["dead_frac"] is not None and rec["layers"]["conv1"]["dead_frac"] is None
        assert rec["epoch"] == (s - 1) // 8 + 1  # 8 batches per epoch
        # loss: the mean over the steps since the previous check, within the epoch
        since = [l for t, (e, l) in spy.losses.items() if s - 3 < t <= s and e == rec["epoch"]]
        assert rec["loss"] == pytest.approx(sum(since) / len(since), rel=1e-5)
        assert rec["step_loss"] == pytest.approx(spy.losses[s][1], rel=1e-6)
    assert mon.records[-1]["step"] == 9 and mon.records[-1]["loss"] == pytest.approx(spy.losses[9][1], rel=1e-5)


def test_activation_probe_matches_forward_across_chunks():
    model = small_cnn()
    model.chunk_size = 32  # a batch of 70 runs the conv block in three chunks
    with torch.no_grad():
        model.layers[0].params["bias"][:2] = -50.0  # two channels dead for every input
    x = torch.randn(70, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    probe = ActivationProbe(model)
    probe.arm()
    with torch.no_grad():
        model.forward(x, train=True)
    stats = {name: (float(m), float(s), None if d is None else float(d)) for name, m, s, d in probe.take()}
    probe.disarm()
    assert len(model.hooks) == 0  # disarmed: the plan runs without hooks again
    with torch.no_grad():
        h = model.layers[0].forward(x, False)
        r = torch.relu(h)
    for name, ref in (("conv1", h), ("relu1", r)):
        mean, std, _ = stats[name]
        assert mean == pytest.approx(float(ref.double().mean()), rel=1e-4, abs=1e-6)
        assert std == pytest.approx(float(ref.double().std(unbiased=False)), rel=1e-4)
    dead_units = float((r.amax(dim=0) <= 0).double().mean())
    assert stats["relu1"][2] == pytest.approx(dead_units)
    assert dead_units >= 2 / 4  # the two killed channels at least
    # evaluation forwards are not recorded
    probe.arm()
    with torch.no_grad():
        model.predict(x)
    assert probe.take() == []
    probe.disarm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("c,filters,k,stride,padding,relu,bias,hw", [
    (1, 32, 3, 1, "valid", True, True, (28, 28)),   # the tutorial's first layer
    (3, 5, 3, 1, "same", True, False, (11, 9)),    # padded, no bias, an odd filter count
    (2, 7, 2, 2, "valid", True, True, (13, 16)),   # a strided conv: the row-by-row path
    (1, 4, 5, 1, "valid", False, True, (12, 12)),  # no ReLU: the conv's figures alone
])
def test_probe_figures_of_a_fused_conv_from_one_native_pass(c, filters, k, stride, padding, relu, bias, hw, dtype):
    """The probe's figures of a fused conv + ReLU + pool node's conv and ReLU come from one native pass that
    writes neither map (cd_conv_stats); they agree with replaying the layers, including the dead units (a
    channel killed by its bias) and a NaN in the input."""
    assert native.library() is not None, native.status()  # CI has a compiler; the replay is tested without
    layers = [Conv2D(filters, k, stride, padding, use_bias=bias)] + ([ReLU()] if relu else [])
    model = Sequential(layers + [MaxPool2D(2), Flatten(), Dense(3)], input_shape=(c, *hw), seed=1, dtype=dtype)
    if bias:
        with torch.no_grad():
            model.layers[0].params["bias"][:1] = -50.0
    assert "+" in model.plan().nodes[0].label  # fused
    x = torch.randn(6, c, *hw, generator=torch.Generator().manual_seed(2), dtype=dtype)
    used = []
    real = ActivationProbe._conv_figures

    def figures(probe, native_pass):
        probe.arm()

        def spy(self, *args):
            done = real(self, *args) if native_pass else False
            used.append(done)
            return done

        ActivationProbe._conv_figures = spy
        try:
            with torch.no_grad():
                model.forward(x, train=True)
        finally:
            ActivationProbe._conv_figures = real
        out = {name: (float(m), float(s), None if d is None else float(d)) for name, m, s, d in probe.take()}
        probe.disarm()
        return out

    fast = figures(ActivationProbe(model), True)
    assert used == [True]
    slow = figures(ActivationProbe(model), False)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    names = ["conv1", "relu1"] if relu else ["conv1"]
    for name in names:
        assert fast[name][:2] == pytest.approx(slow[name][:2], rel=tol, abs=tol), name
    if relu:
        assert fast["relu1"][2] == slow["relu1"][2]
        assert fast["relu1"][2] >= (1 / filters if bias else 0)
    x[3, 0, 2, 2] = float("nan")  # every figure becomes NaN on both paths, no unit of the NaN's reach is dead
    fast, slow = figures(ActivationProbe(model), True), figures(ActivationProbe(model), False)
    for name in names:
        assert math.isnan(fast[name][0]) and math.isnan(slow[name][0]), name
    if relu:
        assert fast["relu1"][2] == slow["relu1"][2]


def test_deep_sigmoid_network_flags_vanishing_gradients():
    out = io.StringIO()
    mon = train(deep_sigmoid(), make_optimizer("sgd", lr=0.1), HealthMonitor(every=2, stream=out), epochs=1)
    vanish = [w for w in mon.warnings if w["rule"] == "vanishing_gradients"]
    assert vanish, mon.warnings
    first = vanish[0]
    assert first["step"] == 6  # checks at steps 2, 4, 6: three checks running (patience 3)
    assert first["where"].split(", ")[0] == "dense1.weight"  # the layer farthest from the loss is worst
    assert first["value"] < first["threshold"] == 1e-7
    assert "sigmoid" in first["remedy"]
    assert "[vanishing_gradients]" in out.getvalue() and "dense1.weight" in out.getvalue()
    # the same depth with ReLU does not vanish
    relu = Sequential([Flatten()] + [l for _ in range(12) for l in (Dense(32), ReLU())] + [Dense(3)],
                      input_shape=(1, 8, 8), seed=0)
    calm = train(relu, make_optimizer("sgd", lr=0.1), HealthMonitor(every=2, stream=None, vanish_threshold=1e-7))
    assert not [w for w in calm.warnings if w["rule"] == "vanishing_gradients"]


def test_huge_learning_rate_flags_exploding_gradients():
    out = io.StringIO()
    mon = train(small_cnn(), make_optimizer("sgd", lr=30.0), HealthMonitor(every=1, stream=out), steps=6)
    boom = [w for w in mon.warnings if w["rule"] == "exploding_gradients"]
    assert boom, mon.warnings
    norms = [r["grad_norm"] for r in mon.records]
    s = boom[0]["step"]
    assert norms[s - 1] > 10 * norms[s - 2] or norms[s - 1] > 1e4 or not math.isfinite(norms[s - 1])
    assert "learning rate" in boom[0]["remedy"]
    high = [w for w in mon.warnings if w["rule"] == "update_ratio" and w["value"] > 1e-2]
    assert high, "a huge learning rate also gives huge update-to-weight ratios"
    # a sane learning rate on the same model: neither exploding nor vanishing
    calm = train(small_cnn(), make_optimizer("adam", lr=1e-3), HealthMonitor(every=1, stream=None), steps=8)
    assert not [w for w in calm.warnings if w["rule"] in ("exploding_gradients", "vanishing_gradients")]


def test_dead_relus_are_flagged_after_patience_checks(capsys):
    model = small_cnn()
    with torch.no_grad():
        model.layers[4].params["bias"].fill_(-100.0)  # dense1's outputs all negative: relu2 dead
    mon = train(model, make_optimizer("sgd", lr=0.0), HealthMonitor(every=1), steps=4)
    assert "health warning at step 3 [dead_relus]" in capsys.readouterr().err  # printed on stderr by default
    dead = [w for w in mon.warnings if w["rule"] == "dead_relus"]
    assert len(dead) == 1 and dead[0]["step"] == 3 and dead[0]["where"] == "relu2"
    assert dead[0]["value"] == 1.0
    assert all(r["layers"]["relu2"]["dead_frac"] == 1.0 for r in mon.records)


def _record(step, norms, loss=1.0, ratios=None, dead=None):
    params = {f"dense{i + 1}.weight": {"grad_norm": n, "ndim": 2,
                                       "update_ratio": None if ratios is None else ratios[i]}
              for i, n in enumerate(norms)}
    layers = {} if dead is None else {"relu1": {"dead_frac": dead}}
    return {"type": "health", "step": step, "grad_norm": math.sqrt(sum(n * n for n in norms)), "loss": loss,
            "params": params, "layers": layers}


def test_rules_need_patience_fire_once_and_rearm():
    rules = HealthRules(vanish_threshold=1e-6, patience=3)
    fired = [rules.evaluate(_record(s, [1e-8, 1.0], loss=1.0 / s)) for s in range(1, 6)]
    assert [len([w for w in f if w["rule"] == "vanishing_gradients"]) for f in fired] == [0, 0, 1, 0, 0]
    rules.evaluate(_record(6, [1.0, 1.0], loss=0.1))  # recovered: the streak ends
    again = [rules.evaluate(_record(s, [1e-8, 1.0], loss=0.1 / s)) for s in range(7, 10)]
    assert [len([w for w in f if w["rule"] == "vanishing_gradients"]) for f in again] == [0, 0, 1]


def test_exploding_rule_growth_and_threshold():
    rules = HealthRules(explode_factor=10.0, explode_threshold=1e4)
    assert not rules.evaluate(_record(1, [1.0]))
    assert not rules.evaluate(_record(2, [5.0]))  # 5x: under the factor
    w = rules.evaluate(_record(3, [80.0]))  # 16x
    assert [x["rule"] for x in w] == ["exploding_gradients"] and "grew" in w[0]["message"]
    rules = HealthRules(explode_threshold=100.0)
    assert [x["rule"] for x in rules.evaluate(_record(1, [500.0]))] == ["exploding_gradients"]
    rules = HealthRules()
    assert "not finite" in rules.evaluate(_record(1, [float("nan")]))[0]["message"]


def test_update_ratio_band_and_plateau():
    rules = HealthRules(patience=2)
    out = [rules.evaluate(_record(s, [1.0, 1.0], ratios=[1e-3, 5e-2], loss=1.0 / s)) for s in (1, 2, 3)]
    ratio = [w for f in out for w in f if w["rule"] == "update_ratio"]
    assert len(ratio) == 1 and ratio[0]["where"] == "dense2.weight" and ratio[0]["threshold"] == 1e-2
    assert "lower the learning rate about 50 times" in ratio[0]["remedy"]
    low = HealthRules(patience=1).evaluate(_record(1, [1.0], ratios=[1e-6]))
    assert low[0]["threshold"] == 1e-4 and "raise the learning rate about 1000 times" in low[0]["remedy"]

    flat = HealthRules(plateau_window=3, plateau_tol=0.01)
    found = [w for s in range(1, 8) for w in flat.evaluate(_record(s, [1.0], loss=2.0 + 0.001 * (s % 2)))]
    assert [w["rule"] for w in found] == ["loss_plateau"] and found[0]["step"] == 6
    later = [w for s in range(8, 14) for w in flat.evaluate(_record(s, [1.0], loss=2.0 + 0.001 * (s % 2)))]
    assert [w["step"] for w in later] == [12]  # fresh windows: 2 x 3 new checks after the last warning
    falling = HealthRules(plateau_window=3, plateau_tol=0.01)
    assert not [w for s in range(1, 12) for w in falling.evaluate(_record(s, [1.0], loss=2.0 * 0.9 ** s))]


def test_clipped_fractions_follow_each_clipper():
    g = [torch.tensor([[0.5, -2.0], [3.0, 0.1]]), torch.tensor([0.2, -0.3])]
    p = [torch.ones(2, 2), torch.ones(2)]
    norms = [t.norm() for t in g]
    by_value = clipped_fractions(["w", "b"], g, p, norms, [ClipSpec("value", 1.0)])
    assert [float(v) for v in by_value] == [0.5, 0.0]
    total = float(torch.sqrt(norms[0] ** 2 + norms[1] ** 2))
    assert [float(v) for v in clipped_fractions(["w", "b"], g, p, norms, [ClipSpec("global_norm", total - 0.1)])] == [1, 1]
    assert [float(v) for v in clipped_fractions(["w", "b"], g, p, norms, [ClipSpec("global_norm", total + 0.1)])] == [0, 0]
    assert [float(v) for v in clipped_fractions(["w", "b"], g, p, norms, [ClipSpec("norm", 1.0)])] == [1, 0]
    # AGC: unit (row) norms 2.06 and 3.0 against 0.5 * ||W row|| = 0.707
    agc = clipped_fractions(["w", "b"], g, p, norms, [ClipSpec("agc", 0.5, 1e-3, ("b",))])
    assert [float(v) for v in agc] == [1.0, 0.0]
    specs = clip_specs(make_optimizer("adam", lr=1e-3, clip_value=0.5))
    assert specs == [ClipSpec("value", 0.5)]
    assert clip_specs(make_optimizer("adam", lr=1e-3)) == []


def test_monitor_reads_clipping_from_the_optimizer():
    mon = train(small_cnn(), make_optimizer("sgd", lr=0.1, clip_value=1e-4), HealthMonitor(every=2, stream=None),
                steps=2)
    fracs = {k: v["clip_frac"] for k, v in mon.records[0]["params"].items()}
    assert fracs["conv1.weight"] > 0.5 and all(0.0 <= f <= 1.0 for f in fracs.values())


@pytest.mark.parametrize("chunk", [0, 16], ids=["whole", "chunks"])
def test_the_probe_keeps_fused_nodes_and_reads_the_layers_inside_them(chunk):
    """Armed, the conv+ReLU+pool pass stays one node; the conv's and the ReLU's figures (read by running the
    node's layers on its input) equal those of the same model run with fusion off, and the fused backward
    after that gives the gradients of an unmonitored step."""
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(3))
    runs = {}
    for name, fusion, armed in (("fused", True, True), ("apart", False, True), ("plain", True, False)):
        model = small_cnn()
        model.set_fusion(fusion)
        model.chunk_size = chunk
        with torch.no_grad():
            model.layers[0].params["bias"][:1] = -50.0  # one channel dead for every input
        probe = ActivationProbe(model)
        if armed:
            probe.arm()
        labels = [node.label for node in model.plan().nodes]
        with torch.no_grad():
            _, dlogits = SoftmaxCrossEntropy()(model.forward(x, train=True), y)
            model.backward(dlogits)
        stats = [(n, float(m), float(s), None if d is None else float(d)) for n, m, s, d in probe.take()]
        probe.disarm()
        runs[name] = (labels, stats, {k: g.clone() for k, g in model.grads().items()})
    if native.library() is not None:
        assert runs["fused"][0][0] == "conv1+relu1+pool1"
    assert runs["apart"][0][:3] == ["conv1", "relu1", "pool1"]
    fused, apart = runs["fused"][1], runs["apart"][1]
    assert [s[0] for s in fused] == [s[0] for s in apart] == ["conv1", "relu1", "dense1", "relu2", "dense2"]
    for a, b in zip(fused, apart):
        assert a[1:3] == pytest.approx(b[1:3], rel=1e-5, abs=1e-7) and a[3] == b[3], a[0]
    assert fused[1][3] >= 1 / 4  # the dead channel's units
    for key, g in runs["plain"][2].items():
        assert torch.equal(runs["fused"][2][key], g), key


def test_fast_path_is_untouched_outside_monitored_steps():
    calls = []

    class Counter(HealthMonitor):
        def on_gradients(self, trainer, step, grads, params):
            calls.append(step)
            super().on_gradients(trainer, step, grads, params)

    model = small_cnn()
    train(model, make_optimizer("sgd", lr=0.01), Counter(every=4, stream=None), steps=10)
    assert calls == [4, 8]
    assert len(model.hooks) == 0


def test_state_dict_round_trip_and_bad_arguments():
    mon = HealthMonitor(every=1, stream=None, patience=2)
    mon.rules.evaluate(_record(1, [1e-9]))
    state = json.loads(json.dumps(mon.state_dict()))
    fresh = HealthMonitor(every=1, stream=None, patience=2)
    fresh.load_state_dict(state)
    assert [w["rule"] for w in fresh.rules.evaluate(_record(2, [1e-9]))] == ["vanishing_gradients"]
    with pytest.raises(ValueError, match="every must be a positive number of steps, got 0"):
        HealthMonitor(every=0)
    with pytest.raises(ValueError, match=r"ratio_range must be \(low, high\)"):
        HealthMonitor(ratio_range=(1e-2, 1e-4))
    with pytest.raises(ValueError, match="patience must be a positive int"):
        HealthRules(patience=0)


def test_monitor_is_on_in_train_runs_and_reaches_metrics_jsonl_and_the_report(tmp_path):
    from convdescent.train.run import read_metrics, train_from_config

    npz = tmp_path / "syn.npz"
    write_npz_dataset(npz, n=96, num_classes=3, shape=(1, 8, 8), seed=3)
    res = train_from_config({"model": "seed_cnn", "dataset": f"npz:{npz}", "val_split": 16, "epochs": 2,
                             "batch_size": 16, "log_every": 0, "lr": 30.0, "optimizer": "sgd", "on_nan": "stop",
                             "health_every": 1}, out=tmp_path / "runs", display="quiet", handle_signals=False)
    checks, warns = health_records(read_metrics(res.run_dir / "metrics.jsonl"))
    assert len(checks) == res.summary["steps"] and checks[0]["step"] == 1
    assert {w["rule"] for w in warns} >= {"exploding_gradients"}
    from convdescent.report import build_report

    html = build_report(res.run_dir).read_text()
    assert 'id="section-gradient-health"' in html and 'id="gradient-health"' in html
    assert "exploding_gradients" in html and "lower the learning rate" in html
    from convdescent.train.config import default_config

    assert default_config()["health_every"] == 50  # on by default


def test_plateau_window_defaults_to_an_epoch_of_checks():
    from types import SimpleNamespace

    from convdescent.diagnostics.health import HealthMonitor

    def begin(monitor, steps_per_epoch):
        trainer = SimpleNamespace(loader=SimpleNamespace(steps_per_epoch=steps_per_epoch), model=None,
                                  optimizer=None, callbacks=(), step=0)
        monitor.on_train_begin(trainer)
        return monitor.rules.plateau_window

    assert begin(HealthMonitor(every=50, activations=False, stream=None), 1719) == 34
    assert begin(HealthMonitor(every=50, activations=False, stream=None), 100) == 10  # never under 10 checks
    assert begin(HealthMonitor(every=50, plateau_window=4, activations=False, stream=None), 1719) == 4
