"""ZeRO stage 1 (convdescent.distributed.zero.ShardedOptimizer) on 2 and 3 gloo processes.

Each process trains the same small CNN on its slice of every global batch, with the optimizer state split
across the processes; after K steps the parameters and the rebuilt unsharded state (``full_state``, on every
process) must be those of the unsharded optimizer on one process over the whole batch: Adam (fused), Adam
with L2 weight decay and a global-norm clip that fires, AdamW with a clip, SGD with momentum, weight decay
and a step schedule, SGD with Nesterov momentum and an element clip. Then the unsharded state of the 2-process
run is cut into shards for 3 processes and for 1, and both continue as the uninterrupted run does.
Everything is float64; tolerance 1e-9 relative, 1e-11 absolute (the gradients differ from the one-process
ones by the order of the sums only).
"""

import pytest
import torch

from spawn_ranks import run_ranks

from convdescent import optim
from convdescent.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from convdescent.losses import SoftmaxCrossEntropy
from convdescent.model import Sequential
from convdescent.models import resnet8, seed_cnn

TOL = dict(rtol=1e-9, atol=1e-11)
DT = torch.float64
K = 4  # steps per phase
BATCH = 12  # the global batch; each of N processes takes BATCH / N

CONFIGS = {
    "adam": lambda: optim.adam(lr=1e-2),
    "adam_l2_clip": lambda: optim.make_optimizer("adam", lr=1e-2, weight_decay=1e-2, clip_norm=0.05, record=True),
    "adamw_clip": lambda: optim.make_optimizer("adamw", lr=1e-2, weight_decay=0.1, clip_norm=0.05),
    "sgd_momentum": lambda: optim.sgd(lr=optim.step_decay(0.1, 2, 0.5), momentum=0.9, weight_decay=1e-3),
    "sgd_nesterov_clip_value": lambda: optim.make_optimizer("sgd", lr=0.05, momentum=0.9, nesterov=True,
                                                            clip_value=0.01, record=True),
}


def make_model():
    return Sequential([Conv2D(4, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(8), ReLU(), Dense(3)],
                      input_shape=(1, 8, 8), seed=0, dtype=DT)


def batches():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2 * K, BATCH, 1, 8, 8, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (2 * K, BATCH), generator=gen)
    return x, y


def gradients(model, x, y):
    logits = model.forward(x, train=True)
    _, dl = SoftmaxCrossEntropy()(logits, y)
    model.backward(dl)
    return model.grads()


def reference(name: str, steps: int):
    """The unsharded optimizer on one process over the whole batch: parameters and state after ``steps``."""
    model, opt = make_model(), CONFIGS[name]()
    params = model.params()
    state = opt.init(params)
    x, y = batches()
    for t in range(steps):
        state = optim.update_and_apply(opt, params, gradients(model, x[t], y[t]), state)
    return {k: v.clone() for k, v in params.items()}, optim.state_dict(state)


# ----- what each process runs -----------------------------------------------------------------------------

def _train(zopt, model, state, world, rank, steps):
    x, y = batches()
    n = BATCH // world
    for t in steps:
        grads = gradients(model, x[t, rank * n:(rank + 1) * n], y[t, rank * n:(rank + 1) * n])
        state = zopt.step(model.params(), grads, state)
    return state


def _worker(rank: int, world: int, out_dir: str, resume_dir: str | None) -> None:
    import torch.distributed as dist

    from convdescent.distributed.zero import ShardedOptimizer, state_nbytes

    out = {"fresh": {}, "resumed": {}, "resumed_alone": {}, "owned": None, "bytes": {}, "errors": []}
    # Refusals come before any communication, so every process can try them on its own.
    few = {f"p{i}": torch.zeros(3) for i in range(world - 1)}
    for attempt in (lambda: ShardedOptimizer(optim.adam(), few),
                    lambda: ShardedOptimizer(optim.adam(), make_model().params()).step(
                        make_model().params(), {"conv1.weight": torch.zeros(1)}, None)):
        try:
            attempt()
            out["errors"].append(None)
        except ValueError as e:
            out["errors"].append(str(e))
    for name, make in CONFIGS.items():
        model = make_model()
        zopt = ShardedOptimizer(make(), model.params())
        out["owned"] = zopt.owned
        state = _train(zopt, model, zopt.init(model.params()), world, rank, range(K))
        full = optim.state_dict(zopt.full_state(state))  # every process calls it and gets it
        out["fresh"][name] = {"params": {k: v.clone() for k, v in model.params().items()}, "full": full}
        if resume_dir is None and rank == 0:
            torch.save(out["fresh"][name], f"{out_dir}/ckpt_{name}.pt")

    if resume_dir is not None:
        alone = dist.new_group([world - 1])  # the last process by itself: a group of one
        for name, make in CONFIGS.items():
            ckpt = torch.load(f"{resume_dir}/ckpt_{name}.pt")
            for key, group in (("resumed", None), ("resumed_alone", alone)):
                if group is not None and rank != world - 1:
                    continue
                model = make_model()
                model.load_state_dict(ckpt["params"])
                zopt = ShardedOptimizer(make(), model.params(), group=group)
                state = _train(zopt, model, zopt.shard_state(ckpt["full"]), zopt.world_size, zopt.rank,
                               range(K, 2 * K))
                out[key][name] = {"params": {k: v.clone() for k, v in model.params().items()},
                                  "full": optim.state_dict(zopt.full_state(state))}

    # Optimizer-state memory per process (Adam: two moments per parameter), float32 as in training.
    groups = {world: None}
    if resume_dir is not None:
        groups[1] = alone
    for n, group in groups.items():
        if group is not None and rank != world - 1:
            continue
        for model_name, build in (("seed_cnn", seed_cnn), ("resnet8", resnet8)):
            params = build(seed=0).params()
            zopt = ShardedOptimizer(optim.adam(), params, group=group)
            out["bytes"][(model_name, n)] = state_nbytes(zopt.init(params))
    torch.save(out, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process run, then the 3-process run (which also resumes the 2-process one on 3 and on 1)."""
    two = tmp_path_factory.mktemp("zero2")
    run_ranks(_worker, 2, str(two), None, timeout=120)
    three = tmp_path_factory.mktemp("zero3")
    run_ranks(_worker, 3, str(three), str(two), timeout=120)
    return {2: [torch.load(two / f"rank{r}.pt") for r in range(2)],
            3: [torch.load(three / f"rank{r}.pt") for r in range(3)]}


def assert_state_close(ours, ref, path="state"):
    if isinstance(ref, dict):
        assert set(ours) == set(ref), path
        for k in ref:
            assert_state_close(ours[k], ref[k], f"{path}.{k}")
    elif isinstance(ref, torch.Tensor):
        torch.testing.assert_close(ours, ref, **TOL, msg=path)
    else:
        assert ours == ref, path


# ----- the checks -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_sharded_run_matches_the_unsharded_one(runs, world, name):
    params_ref, state_ref = reference(name, K)
    for out in runs[world]:
        got = out["fresh"][name]
        for k, v in params_ref.items():
            torch.testing.assert_close(got["params"][k], v, **TOL, msg=k)
        assert_state_close(got["full"], state_ref)
    # The shards split the parameters: each is somebody's, nobody's twice.
    owned = [out["owned"] for out in runs[world]]
    assert sorted(k for names in owned for k in names) == sorted(params_ref)
    assert all(owned)


@pytest.mark.parametrize("world", [2, 3])
def test_refusals_name_what_is_wrong(runs, world):
    for out in runs[world]:
        too_few, bad_names = out["errors"]
        assert too_few == (f"sharding the optimizer needs at least one parameter tensor per process: the model has "
                           f"{world - 1} for {world} processes; use fewer processes or do not shard the optimizer")
        assert bad_names is not None and "grads must have the names it was built with" in bad_names
        assert "missing ['conv1.bias'" in bad_names


def test_the_clips_fire_so_the_global_norm_matters():
    """Clipping by a local norm would give other parameters: make sure the clips do act in these runs."""
    for name in ("adam_l2_clip", "sgd_nesterov_clip_value"):
        _, state = reference(name, K)
        assert int(state["clipped_steps"]) == K, name
    # adamw_clip's clip (not recorded): the state keeps the last step's flag.
    _, state = reference("adamw_clip", K)
    assert bool(state["0"]["fired"])


@pytest.mark.parametrize("key", ["resumed", "resumed_alone"], ids=["on3", "on1"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_two_process_state_resumes_on_three_and_on_one(runs, key, name):
    params_ref, state_ref = reference(name, 2 * K)
    outs = runs[3] if key == "resumed" else runs[3][-1:]
    for out in outs:
        got = out[key][name]
        for k, v in params_ref.items():
            torch.testing.assert_close(got["params"][k], v, **TOL, msg=k)
        assert_state_close(got["full"], state_ref)


def test_optimizer_state_per_process_shrinks_with_the_shards(runs):
    """Adam's state bytes per process for N = 1, 2, 3 (printed for the notes; run with -s to see them)."""
    from convdescent.distributed.zero import partition

    per = {}
    for world in (2, 3):
        for out in runs[world]:
            for (model, n), b in out["bytes"].items():
                per.setdefault((model, n), []).append(b)
    for model, build in (("seed_cnn", seed_cnn), ("resnet8", resnet8)):
        params = build(seed=0).params()
        total = optim.state_dict(optim.adam().init(params))
        full = sum(t.numel() * t.element_size() for t in (*total["0"]["mu"].values(), *total["0"]["nu"].values()))
        assert per[(model, 1)] == [full]
        largest = max(p.numel() for p in params.values()) * 2 * 4
        for n in (2, 3):
            sizes = per[(model, n)]
            print(f"{model}: Adam state per process with {n} processes: {sizes} bytes "
                  f"(unsharded {full}; {full / max(sizes):.2f}x less on the largest shard)")
            assert sum(sizes) == full
            # Greedy whole-tensor shards: the largest holds at most the mean plus one tensor.
            assert max(sizes) <= full / n + largest
            shards = partition({k: p.numel() for k, p in params.items()}, n)
            assert sorted(sizes) == sorted(sum(params[k].numel() for k in s) * 2 * 4 for s in shards)
        print(f"{model}: unsharded {full} bytes with 1 process")


def test_partition_is_balanced_deterministic_and_whole():
    from convdescent.distributed.zero import partition

    sizes = {"a": 10, "b": 7, "c": 7, "d": 3, "e": 1, "f": 1}
    shards = partition(sizes, 3)
    assert shards == partition(dict(sizes), 3)
    assert shards == [["a"], ["b", "d"], ["c", "e", "f"]]
    assert partition(sizes, 1) == [list(sizes)]
    assert [sum(sizes[k] for k in s) for s in partition(sizes, 2)] == [15, 14]
    with pytest.raises(ValueError, match="positive int"):
        partition(sizes, 0)


def test_sharded_optimizer_needs_a_process_group():
    from convdescent.distributed.zero import ShardedOptimizer

    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedOptimizer(optim.adam(), make_model().params())
