"""Loss landscape: the line from the initial to the final weights, filter-normalized directions, the plane,
the initial weights of a run rebuilt from its seed, and the landscape command."""

from __future__ import annotations

import json

import pytest
import torch

from convdescent import BatchNorm2D, Conv2D, Dense, Flatten, ReLU, Sequential, SoftmaxCrossEntropy
from convdescent.data.synthetic import write_npz_dataset
from convdescent.diagnostics.cli import initial_weights
from convdescent.diagnostics.cli import main as diag_main
from convdescent.train.step import evaluate
from convdescent.diagnostics.landscape import (compute_landscape, filter_normalized_direction, loss_on_line,
                                               loss_on_plane)


# one torch thread: on the shared 2-core machine two threads ran these small problems many times slower
pytestmark = pytest.mark.usefixtures("one_thread")


def setup(seed=0):
    model = Sequential([Conv2D(3, 3), BatchNorm2D(), ReLU(), Flatten(), Dense(4)], input_shape=(1, 6, 6), seed=seed)
    theta0 = {k: v.clone() for k, v in model.params().items()}
    with torch.no_grad():
        for p in model.params().values():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(9)))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 1, 6, 6, generator=g), torch.randint(0, 4, (40,), generator=g)
    return model, theta0, x, y


def test_line_hits_both_ends_and_restores_weights():
    model, theta0, x, y = setup()
    loss = SoftmaxCrossEntropy()
    final = {k: v.clone() for k, v in model.params().items()}
    res = loss_on_line(model, loss, theta0, model.params(), [0.0, 0.5, 1.0], {"train": (x, y)})
    for k, p in model.params().items():
        assert torch.equal(p, final[k])  # weights put back, even though theta1 was the model's own tensors
    assert res["train"]["loss"][2] == pytest.approx(evaluate(model, loss, x, y)[0], rel=1e-6)
    model.load_state_dict({**model.state_dict(), **theta0})
    assert res["train"]["loss"][0] == pytest.approx(evaluate(model, loss, x, y)[0], rel=1e-6)
    mid = {k: 0.5 * (theta0[k] + final[k]) for k in final}
    model.load_state_dict({**model.state_dict(), **mid})
    assert res["train"]["loss"][1] == pytest.approx(evaluate(model, loss, x, y)[0], rel=1e-5)
    with pytest.raises(ValueError, match="initial weights do not match"):
        loss_on_line(model, loss, {"w": torch.zeros(1)}, final, [0.0], {"train": (x, y)})


def test_filter_normalized_directions():
    model, _, _, _ = setup()
    params = model.params()
    d = filter_normalized_direction(params, torch.Generator().manual_seed(0))
    for k, p in params.items():
        if p.dim() <= 1:
            assert torch.count_nonzero(d[k]) == 0  # biases and batch-norm parameters stay put (Li et al.)
        else:
            torch.testing.assert_close(d[k].flatten(1).norm(dim=1), p.flatten(1).norm(dim=1))
    d2 = filter_normalized_direction(params, torch.Generator().manual_seed(1))
    assert not torch.allclose(d["conv1.weight"], d2["conv1.weight"])


def test_plane_center_is_the_final_loss_and_landscape_summary(tmp_path):
    from convdescent.diagnostics.landscape import plot_line, plot_plane

    model, theta0, x, y = setup()
    loss = SoftmaxCrossEntropy()
    center_loss = evaluate(model, loss, x, y)[0]
    res = compute_landscape(model, loss, theta0, {"train": (x, y)}, line_points=5, plane_points=3,
                            plane_range=0.5, seed=2)
    assert res.alphas[0] == -0.25 and res.alphas[-1] == 1.25 and len(res.alphas) == 5
    assert res.plane.shape == (3, 3)
    assert float(res.plane[1, 1]) == pytest.approx(center_loss, rel=1e-6)
    gen = torch.Generator().manual_seed(2)
    params = {k: v.clone() for k, v in model.params().items()}
    d1 = filter_normalized_direction(params, gen)
    d2 = filter_normalized_direction(params, gen)
    corner = loss_on_plane(model, loss, params, d1, d2, [0.5], [-0.5], x, y)
    assert float(corner[0, 0]) == pytest.approx(float(res.plane[0, 2]), rel=1e-6)
    text = res.summary()
    assert "line (train)" in text and "plane (train): loss" in text
    # the grid (-0.25, 0.125, ..., 1.25) misses 0 and 1: the summary says which points it reads, with their losses
    losses = res.line["train"]["loss"]
    assert f"loss {losses[1]:.4f} at a=0.125, the point nearest 0 (initial)" in text
    assert f"{losses[3]:.4f} at a=0.875, the point nearest 1 (final)" in text
    assert f"loss {float(res.plane[1, 1]):.4f} at the final weights" in text
    assert json.loads(json.dumps(res.to_dict()))["plane"][1][1] == pytest.approx(center_loss, rel=1e-6)
    assert plot_line(res, tmp_path / "l.png").stat().st_size > 1000
    assert plot_plane(res, tmp_path / "p.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="plane_points must be 0"):
        compute_landscape(model, loss, theta0, {"train": (x, y)}, plane_points=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from convdescent.train.run import train_from_config

    tmp = tmp_path_factory.mktemp("landscape")
    npz = tmp / "syn.npz"
    write_npz_dataset(npz, n=60, num_classes=3, shape=(1, 8, 8), seed=5)
    base = {"model": "seed_cnn", "dataset": f"npz:{npz}", "val_split": 10, "epochs": 1, "batch_size": 10,
            "log_every": 0, "seed": 7}
    frozen = train_from_config({**base, "optimizer": "sgd", "lr": 0.0, "name": "frozen"}, out=tmp / "runs",
                               display="quiet", handle_signals=False)
    moved = train_from_config({**base, "lr": 1e-2, "name": "moved"}, out=tmp / "runs", display="quiet",
                              handle_signals=False)
    return frozen.run_dir, moved.run_dir


def test_initial_weights_rebuilt_from_the_run_seed(runs):
    from convdescent.train.run import load_run

    frozen, moved = runs
    run = load_run(frozen, checkpoint="last")
    theta0, source = initial_weights(run)
    assert source.startswith("rebuilt from seed 7")
    # with a zero learning rate the final weights are the initial ones, so the rebuild must equal them
    for k, p in run.model.params().items():
        assert torch.equal(theta0[k], p)
    other, _ = initial_weights(run, init_seed=8)
    assert not torch.equal(other["conv1.weight"], run.model.params()["conv1.weight"])


def test_landscape_command(runs, capsys):
    _, moved = runs
    code = diag_main(["landscape", str(moved), "--examples", "20", "--line-points", "4", "--plane-points", "3"])
    text = capsys.readouterr().out
    assert code == 0, text
    folder = moved / "diagnostics"
    for name in ("landscape_line.png", "landscape_plane.png", "landscape.json"):
        assert (folder / name).is_file()
    data = json.loads((folder / "landscape.json").read_text())
    assert len(data["alphas"]) == 4 and len(data["plane"]) == 3 and set(data["line"]) == {"train", "test"}
    assert "Initial weights: rebuilt from seed 7" in text and "line (train): loss" in text
    code = diag_main(["landscape", str(moved), "--examples", "20", "--line-points", "3", "--plane-points", "0",
                      "--json", "--out", str(moved / "other")])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["plane"] is None and not (moved / "other" / "landscape_plane.png").exists()
    assert diag_main(["landscape", str(moved), "--line-range", "1", "0"]) == 2
    assert "--line-range must be LOW HIGH with LOW < HIGH" in capsys.readouterr().err
    assert diag_main(["landscape", str(moved / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
