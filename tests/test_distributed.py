"""Data-parallel training (convdescent.distributed) on gloo over 127.0.0.1, ports chosen at run time.

A run on N processes must be the training of one process at the same global batch: the same seeded order,
each rank taking its part of every global batch, the gradient the mean over the global batch. The weights
are compared after a few dozen steps; they differ only by the order float32 sums are taken in (the
all-reduce adds the ranks' weighted gradients), so the tolerance is 2e-5 absolute (SGD stays near 1e-7,
Adam near 2e-6: its update divides by sqrt(v), which amplifies rounding on near-zero gradients).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from convdescent.cli import main
from convdescent.data.loader import BatchLoader, shard_bounds
from convdescent.data.synthetic import write_npz_dataset
from convdescent.distributed import free_port
from convdescent.train import train_from_config
from convdescent.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
JOBS = Path(__file__).with_name("dist_jobs.py")
ATOL = 2e-5
TIMEOUT = "30"  # seconds a collective may wait for a peer in these tests


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "syn.npz"
    # 200 training images after a 40-image validation split; batches of 12: 16 full batches and one of 8
    write_npz_dataset(path, n=240, num_classes=3, shape=(1, 8, 8), classes=["a", "b", "c"], seed=3)
    return f"npz:{path}"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["CONVDESCENT_DIST_TIMEOUT"] = TIMEOUT
    env.update(extra)
    return env


def _base(data, **kw) -> dict:
    cfg = dict(model="seed_cnn", dataset=data, val_split=40, batch_size=12, steps=24, health_every=0,
               log_every=0, seed=1)
    cfg.update(kw)
    return cfg


def _weights(run_dir) -> dict:
    return load_checkpoint(Path(run_dir) / "checkpoints" / "last.pt")["model"]


def _gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _flat_gap(a, b) -> float:
    """The largest difference between two nested states (dicts of tensors and numbers) of the same form."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max([_flat_gap(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, (list, tuple)):
        return max([_flat_gap(x, y) for x, y in zip(a, b)] or [0.0])
    if isinstance(a, torch.Tensor):
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    assert a == b
    return 0.0


def _torchrun(n: int, jobs: list, tmp_path, timeout=240) -> None:
    spec = tmp_path / f"jobs{n}.json"
    spec.write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(JOBS),
                           str(spec)], env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _cli(args, timeout=240, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convdescent", "train", *args], env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------- sharding

def test_each_rank_takes_its_part_of_the_same_global_batches():
    x = torch.arange(51, dtype=torch.uint8).view(51, 1, 1, 1)
    y = torch.arange(51)
    one = [yb for _, yb in BatchLoader(x, y, 12, seed=5)]
    parts = [[yb for _, yb in BatchLoader(x, y, 12, seed=5, shard=(r, 3))] for r in range(3)]
    for i, whole in enumerate(one):
        assert torch.equal(torch.cat([parts[r][i] for r in range(3)]), whole)
    assert [len(parts[r][-1]) for r in range(3)] == [1, 1, 1]  # the last batch: 3 examples, one per rank
    assert shard_bounds(2, 2, 3) == (2, 2) and shard_bounds(14, 1, 3) == (5, 10)


def test_augmented_parts_are_the_parts_of_the_augmented_global_batch():
    x = torch.randint(0, 255, (24, 1, 6, 6), dtype=torch.uint8)
    y = torch.arange(24)
    one = [xb for xb, _ in BatchLoader(x, y, 8, seed=2, augment="crop:2,flip")]
    halves = [[xb for xb, _ in BatchLoader(x, y, 8, seed=2, augment="crop:2,flip", shard=(r, 2))] for r in (0, 1)]
    for i, whole in enumerate(one):
        assert torch.equal(torch.cat([halves[0][i], halves[1][i]]), whole)


def test_a_batch_the_processes_do_not_divide_is_refused_naming_both_numbers():
    x = torch.zeros(40, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"batch size 10 is not divisible by 3 processes.*multiple of 3"):
        BatchLoader(x, torch.zeros(40, dtype=torch.int64), 10, shard=(0, 3))
    with pytest.raises(ValueError, match=r"last batch of each epoch holds 1 example.*--drop-last"):
        BatchLoader(x[:37], torch.zeros(37, dtype=torch.int64), 12, shard=(0, 3))


def test_buckets_fill_in_backward_order_and_the_first_leaves_before_the_backward_ends():
    """One process in a gloo group of one: the reducer's buckets, what they carry and their timing."""
    import torch.distributed as dist

    from convdescent import SoftmaxCrossEntropy, seed_cnn
    from convdescent.distributed import GradientReducer
    from convdescent.train.step import compute_gradients

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = seed_cnn(seed=0)
        reducer = GradientReducer(model, bucket_mb=25.0)
        # as torch's DDP: a small first bucket (closed at 1 MiB) for the last layers, then the rest
        assert [sorted(b.names) for b in reducer.buckets] == [
            ["dense1.bias", "dense1.weight", "dense2.bias", "dense2.weight"], ["conv1.bias", "conv1.weight"]]
        x, y = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10
        for _ in range(2):
            reducer.begin()
            reducer.set_numbers(torch.tensor([1.5, 7.0, 0.0, 1.0, 0.0]))
            _, _, grads = compute_gradients(model, SoftmaxCrossEntropy(), x, y)
            expected = {k: g.clone() for k, g in grads.items()}
            reduced, numbers = reducer.finish()
            assert numbers.tolist() == [1.5, 7.0, 0.0, 1.0, 0.0]
            assert all(torch.equal(reduced[k], expected[k]) for k in expected)
        first, last = reducer.buckets
        assert first.launched_at < last.launched_at  # launched while conv1's backward was still to come
        stats = reducer.stats()
        assert stats["steps"] == 2 and 0.0 <= stats["overlap"] <= 1.0 and stats["wait_per_step_s"] >= 0.0
        reducer.close()
        assert len(model.hooks) == 0  # the hook is gone with the reducer
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- same training

BN_NET = """name = "bn_net"
[[layers]]
type = "Conv2D"
filters = 6
kernel_size = 3
use_bias = false
[[layers]]
type = "BatchNorm2D"
[[layers]]
type = "ReLU"
[[layers]]
type = "MaxPool2D"
pool_size = 2
[[layers]]
type = "Flatten"
[[layers]]
type = "Dense"
units = 3
"""


def test_two_and_three_processes_train_as_one_and_a_two_process_run_resumes_on_one_and_on_three(data, tmp_path):
    """Plain, --sync-bn and --shard-optimizer runs on 2 and 3 processes against one process; a 2-process run
    (plain and sharded) stopped halfway resumes on 1 and on 3 processes and ends where one process ends."""
    net = tmp_path / "bn_net.toml"
    net.write_text(BN_NET)
    # a global-norm clip that fires: it must see the norm of the global gradient
    sgd = _base(data, optimizer="sgd", momentum=0.9, lr=0.05, health_every=10, clip_norm=0.5)
    adam = _base(data, optimizer="adam", lr=0.003)
    bn = _base(data, model=f"file:{net}", optimizer="adam", lr=0.01)
    configs = {"sgd": sgd, "adam": adam, "bn": dict(bn, sync_bn=True), "zero": dict(adam, shard_optimizer=True),
               "zero_sgd": dict(sgd, shard_optimizer=True)}
    jobs = lambda n: [{"config": c, "run_dir": str(tmp_path / f"{k}{n}")} for k, c in configs.items()]  # noqa: E731
    _torchrun(2, jobs(2) + [{"config": dict(adam, steps=12), "run_dir": str(tmp_path / "half")},
                            {"config": dict(adam, steps=12, shard_optimizer=True), "run_dir": str(tmp_path / "zhalf")}],
              tmp_path)
    import shutil

    for n in (1, 3):
        shutil.copytree(tmp_path / "half", tmp_path / f"half{n}")
        shutil.copytree(tmp_path / "zhalf", tmp_path / f"zhalf{n}")
    for name in ("half1", "zhalf1"):
        resumed = train_from_config({"steps": 24}, resume=tmp_path / name, display="none")
        assert resumed.summary["steps"] == 24
    _torchrun(3, jobs(3) + [{"config": {"steps": 24}, "resume": str(tmp_path / "half3")},
                            {"config": {"steps": 24}, "resume": str(tmp_path / "zhalf3")}], tmp_path)
    one = {k: train_from_config(c, run_dir=tmp_path / f"{k}1", display="none").model.state_dict()
           for k, c in {"sgd": sgd, "adam": adam, "bn": bn}.items()}
    one["zero"], one["zero_sgd"] = one["adam"], one["sgd"]
    for n in (2, 3):
        for key in configs:
            assert _gap(_weights(tmp_path / f"{key}{n}"), one[key]) < ATOL, (key, n)
    for name in ("half1", "half3", "zhalf1", "zhalf3"):
        assert _gap(_weights(tmp_path / name), one["adam"]) < ATOL, name
    # the running statistics of synced batch norm are those of the global batch; a sharded optimizer's
    # checkpoint holds the ordinary, whole optimizer state
    bn_state = _weights(tmp_path / "bn2")
    assert any("running_mean" in k for k in bn_state)
    zero_opt = load_checkpoint(tmp_path / "zero2" / "checkpoints" / "last.pt")["optimizer"]
    plain_opt = load_checkpoint(tmp_path / "adam1" / "checkpoints" / "last.pt")["optimizer"]
    assert _flat_gap(zero_opt, plain_opt) < ATOL
    zsum = json.loads((tmp_path / "zero2" / "summary.json").read_text())["distributed"]
    asum = json.loads((tmp_path / "adam2" / "summary.json").read_text())["distributed"]
    # rank 0 keeps the optimizer state of about half of the elements (large tensors are cut into row blocks)
    assert zsum["sharded_optimizer"]
    assert 0.45 < zsum["optimizer_state_bytes"] / asum["optimizer_state_bytes"] < 0.55
    # rank 0 alone wrote each run directory, with the world size in its configuration and figures
    summary = json.loads((tmp_path / "sgd3" / "summary.json").read_text())
    assert summary["distributed"]["world_size"] == 3 and summary["distributed"]["steps"] == 24
    assert 0.0 <= summary["distributed"]["overlap"] <= 1.0
    assert "nproc = 3" in (tmp_path / "sgd3" / "config.toml").read_text()
    ckpt = load_checkpoint(tmp_path / "half3" / "checkpoints" / "last.pt")
    assert ckpt["loader"]["batch_size"] == 12 and ckpt["step"] == 24  # the global position, not a rank's
    for n, key in ((2, "sgd"), (3, "sgd"), (2, "zero_sgd"), (3, "zero_sgd")):
        records = [json.loads(ln) for ln in (tmp_path / f"{key}{n}" / "metrics.jsonl").read_text().splitlines()]
        one_records = [json.loads(ln) for ln in (tmp_path / "sgd1" / "metrics.jsonl").read_text().splitlines()]
        assert [r["type"] for r in records] == [r["type"] for r in one_records]
        assert sum(r["type"] == "health" for r in records) == 2  # steps 10 and 20
        for a, b in zip(records, one_records):  # figures of the global batch, as one process has them
            if a["type"] == "epoch":
                assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["acc"] == b["acc"]
                assert a["val_acc"] == b["val_acc"] and a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
            if a["type"] == "health":  # gradients and activation statistics over the global batch
                assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
                assert a["step_loss"] == pytest.approx(b["step_loss"], rel=1e-4)
                for layer, st in b["layers"].items():
                    assert a["layers"][layer]["act_mean"] == pytest.approx(st["act_mean"], rel=1e-4, abs=1e-7)
                    assert a["layers"][layer]["act_std"] == pytest.approx(st["act_std"], rel=1e-4, abs=1e-7)
                    assert a["layers"][layer]["dead_frac"] == st["dead_frac"]


def test_two_torchrun_nodes_on_one_machine_train_as_one_process(data, tmp_path):
    cfg = _base(data, optimizer="sgd", momentum=0.9, lr=0.05)
    port = free_port()
    args = ["--model", "seed_cnn", "--dataset", data, "--val-split", "40", "--batch-size", "12", "--steps", "24",
            "--health-every", "0", "--log-every", "0", "--seed", "1", "--optimizer", "sgd", "--momentum", "0.9",
            "--lr", "0.05", "--out", str(tmp_path / "runs"), "--no-report", "--quiet"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(i),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "-m", "convdescent", "train", *args], env=_env(OMP_NUM_THREADS="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=240) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    (run,) = (tmp_path / "runs").iterdir()  # one run directory, written by rank 0
    one = train_from_config(cfg, run_dir=tmp_path / "one", display="none").model.state_dict()
    assert _gap(_weights(run), one) < ATOL
    assert "Run written to" in outs[0][0] and "Run written to" not in outs[1][0]


# ----------------------------------------------------------------------------------------------- faults

def _children(pid: int) -> dict[int, int]:
    """rank -> pid of the worker processes whose parent is ``pid``."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            for item in env:
                if item.startswith(b"RANK="):
                    out[int(item[5:])] = int(entry.name)
    return out


def _long_run(data, tmp_path, *extra):
    args = ["--model", "seed_cnn", "--dataset", data, "--val-split", "40", "--batch-size", "4", "--steps", "100000",
            "--health-every", "0", "--log-every", "0", "--optimizer", "sgd", "--lr", "0.01", "--checkpoint-every",
            "5", "--out", str(tmp_path / "runs"), "--no-report", "--nproc", "2", *extra]
    return subprocess.Popen([sys.executable, "-m", "convdescent", "train", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(tmp_path, proc, limit=180) -> Path:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        runs = list((tmp_path / "runs").glob("*/checkpoints/last.pt")) if (tmp_path / "runs").exists() else []
        if runs:
            return runs[0].parent.parent
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no checkpoint appeared: {proc.communicate()[1][-2000:]}")


def test_a_killed_worker_ends_the_run_in_bounded_time_naming_its_rank_and_the_run_resumes(data, tmp_path):
    proc = _long_run(data, tmp_path)
    run = _wait_for_checkpoint(tmp_path, proc)
    workers = _children(proc.pid)
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[1], signal.SIGKILL)
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=90)
    took = time.monotonic() - t0
    assert proc.returncode != 0 and took < 60, (proc.returncode, took)
    assert "worker rank 1" in err and "SIGKILL" in err and "--resume" in err, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert not _children(proc.pid) and all(not Path(f"/proc/{p}").exists() for p in workers.values())
    saved = load_checkpoint(run / "checkpoints" / "last.pt")  # complete and readable
    step = int(saved["step"])
    assert step >= 5
    assert main(["train", "--resume", str(run), "--steps", str(step + 6), "--nproc", "1", "--quiet",
                 "--no-report"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == step + 6


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_checkpoints_once_and_stops_every_worker(data, tmp_path, sig):
    proc = _long_run(data, tmp_path)
    run = _wait_for_checkpoint(tmp_path, proc)
    workers = _children(proc.pid)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert err.count("Continue with:") == 1 and "Traceback" not in err, err[-2000:]
    # what the user reads: the notice and the resume command, nothing of the launcher's own logging
    assert all(not ln or ln.startswith(("convdescent:", f"{sig.name} received")) for ln in err.splitlines()), err
    assert all(not Path(f"/proc/{p}").exists() for p in workers.values())
    summary = json.loads((run / "summary.json").read_text())
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    assert summary["status"] == "interrupted" and saved["step"] == summary["steps"]


@pytest.mark.parametrize("extra", [[], ["--health-every", "1", "--clip-norm", "1.0"], ["--shard-optimizer"]],
                         ids=["plain", "health_clip", "zero"])
def test_a_non_finite_value_on_one_rank_stops_every_rank_with_one_message_naming_that_rank(tmp_path, extra):
    """Only rank 1's part of the third global batch holds non-zero images, and conv1's weights (3e38, bias 0)
    overflow to inf on any non-zero pixel while an all-zero image stays finite (``unit`` maps 0 to 0): every
    rank must stop with the NaN exit status, and the one message must name rank 1, step 3 and conv1 (also
    with the health monitor and global-norm clipping at every step, and with the optimizer state sharded)."""
    import numpy as np

    from convdescent.cli import EXIT_NONFINITE
    from convdescent.train.checkpoint import save_checkpoint

    n, batch, bad_step, seed = 48, 12, 3, 1
    ids = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)
    parts = [[yb for _, yb in BatchLoader(ids, torch.arange(n), batch, seed=seed, shard=(r, 2))] for r in (0, 1)]
    bad = parts[1][bad_step - 1]  # the examples rank 1 takes at step 3 (first epoch: 4 steps)
    assert len(bad) == 6 and shard_bounds(batch, 1, 2) == (6, 12)
    x = np.zeros((n, 1, 8, 8), np.uint8)
    x[bad.numpy()] = 255
    path = tmp_path / "one_rank.npz"
    np.savez(path, x=x, y=np.arange(n) % 3, x_test=np.zeros((6, 1, 8, 8), np.uint8), y_test=np.arange(6) % 3)
    data = f"npz:{path}"

    # the starting weights: a one-step run whose conv1 is then set to overflow on any lit pixel
    init = tmp_path / "init"
    train_from_config(_base(data, val_split=0, steps=1, optimizer="sgd", lr=0.01), run_dir=init, display="quiet")
    ckpt = init / "checkpoints" / "last.pt"
    state = load_checkpoint(ckpt)
    state["model"]["conv1.weight"] = torch.full_like(state["model"]["conv1.weight"], 3e38)
    state["model"]["conv1.bias"] = torch.zeros_like(state["model"]["conv1.bias"])
    save_checkpoint(ckpt, state)

    t0 = time.monotonic()
    proc = _cli(["--dataset", data, "--val-split", "0", "--batch-size", str(batch), "--steps", "8", "--seed",
                 str(seed), "--optimizer", "sgd", "--lr", "0.01", "--init-from", str(init), "--checkpoint", "last",
                 "--nan-check-every", "4", "--checkpoint-every", "2", "--health-every", "0", "--log-every", "0",
                 "--normalize", "unit", "--nproc", "2", "--quiet", "--no-report", "--out", str(tmp_path / "runs"), *extra],
                timeout=150)
    took = time.monotonic() - t0
    err = proc.stderr
    assert proc.returncode == EXIT_NONFINITE and took < 120, (proc.returncode, took, err[-3000:])
    stops = [ln for ln in err.splitlines() if ln.startswith("convdescent: training stopped:")]
    assert len(stops) == 1 and err.count("training stopped") == 1, err[-3000:]
    assert "at step 3 on rank 1 " in stops[0] and "conv1" in stops[0], stops[0]
    assert "Traceback" not in err, err[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    saved = load_checkpoint(run / "checkpoints" / "last.pt")  # the last good state: step 2, finite weights
    assert saved["step"] == 2, saved["step"]
    assert all(bool(torch.isfinite(t).all()) for t in saved["model"].values())
    assert float(saved["model"]["conv1.weight"].max()) == pytest.approx(3e38, rel=1e-6)


# ----------------------------------------------------------------------------------------------- clear errors

def test_a_batch_size_the_processes_do_not_divide_is_one_clear_error(data, tmp_path):
    proc = _cli(["--model", "seed_cnn", "--dataset", data, "--val-split", "40", "--batch-size", "7", "--steps", "2", "--nproc", "2",
                 "--out", str(tmp_path / "runs")])
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("convdescent:")]
    assert lines == ["convdescent: error: batch size 7 is not divisible by 2 processes: each process takes "
                     "batch_size / nproc examples per step; choose a multiple of 2 (e.g. 6 or 8) or another "
                     "--nproc"], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_port_in_use_is_one_clear_error(data, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = _cli(["--dataset", data, "--steps", "2", "--nproc", "2", "--out", str(tmp_path)],
                    MASTER_PORT=str(port))
    assert proc.returncode == 2
    assert f"port {port} on 127.0.0.1 (MASTER_PORT) is already in use" in proc.stderr
    assert "Traceback" not in proc.stderr


def _rank_process(rank: int, world: int, port: int, args: list, **env):
    return subprocess.Popen([sys.executable, "-m", "convdescent", "train", *args],
                            env=_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_processes_started_with_other_settings_stop_with_one_error_naming_the_difference(data, tmp_path):
    port = free_port()
    base = ["--dataset", data, "--val-split", "40", "--batch-size", "8", "--steps", "2", "--out", str(tmp_path)]
    procs = [_rank_process(r, 2, port, base + ["--seed", str(r)]) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    assert outs[0][1].strip() == ("convdescent: error: the processes of this run were started with different "
                                  "settings (seed 1 on rank 1, 0 on rank 0); start every process with the same "
                                  "command and configuration"), outs[0][1]
    assert outs[1][1].strip() == ""  # one message for the run
    assert not any(tmp_path.glob("*/config.toml"))


def test_a_rendezvous_that_never_completes_is_one_clear_error(data, tmp_path):
    port = free_port()
    proc = _rank_process(0, 2, port, ["--dataset", data, "--steps", "2", "--out", str(tmp_path)],
                         CONVDESCENT_DIST_TIMEOUT="3")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.startswith("convdescent: error: rank 0 waited 3s at 127.0.0.1:") and "Traceback" not in err, err


def test_cuda_workers_get_a_gpu_each_and_share_them_only_over_gloo(monkeypatch):
    """NCCL needs one GPU per worker; gloo (CUDA tensors through host memory) lets workers share them in turn."""
    from convdescent.distributed import DistributedError, World, worker_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    worlds = [World(rank=r, size=3, local_rank=r, local_size=3) for r in range(3)]
    assert [worker_device("cuda", w, "gloo") for w in worlds] == ["cuda:0", "cuda:1", "cuda:0"]
    assert [worker_device("cuda", w, "nccl") for w in worlds[:2]] == ["cuda:0", "cuda:1"]
    assert [worker_device("cuda:0", w, "nccl") for w in worlds[:2]] == ["cuda:0", "cuda:1"]  # a resumed config
    for backend in ("nccl", "auto"):
        with pytest.raises(DistributedError, match="only 2 CUDA devices.*--backend gloo"):
            worker_device("cuda", worlds[2], backend)
    assert worker_device("cpu", worlds[2], "auto") == "cpu"
    assert worker_device("cuda", World(), "auto") == "cuda"  # one process: the device as given
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(DistributedError, match="no CUDA device"):
        worker_device("cuda", worlds[0], "gloo")


def test_gradient_bucket_slots_are_laid_out_as_their_parameters():
    """Each slot of a bucket has its parameter's strides (a Dense weight is column-major), the slots tile the
    buffer without overlap, and a gradient copied in comes back equal: no transposing copy on either side."""
    from convdescent import Conv2D, Dense, Flatten, Sequential
    from convdescent.distributed.reducer import _Bucket

    model = Sequential([Conv2D(3, 3), Flatten(), Dense(7), Dense(4)], input_shape=(2, 6, 5), seed=0)
    params = model.params()
    assert not params["dense1.weight"].is_contiguous()  # the layout this test is about
    bucket = _Bucket(list(params), params, torch.float32, torch.device("cpu"), extra=2)
    base = bucket.buffer.data_ptr()
    spans = []
    for name, p in params.items():
        view = bucket.views[name]
        assert view.shape == p.shape and view.stride() == p.stride(), name
        start = (view.data_ptr() - base) // view.element_size()
        spans.append((start, start + p.numel()))
        g = torch.randn(p.shape).t().contiguous().t() if p.dim() == 2 else torch.randn(p.shape)
        view.copy_(g)
        assert torch.equal(view, g)
    spans.sort()
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] + 2 == bucket.buffer.numel()
