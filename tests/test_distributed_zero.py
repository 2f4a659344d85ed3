"""ZeRO stage 1 (convdescent.distributed.zero.ShardedOptimizer) on 2 and 3 gloo processes.

Each process trains the same small CNN on its slice of every global batch, with the optimizer state split
across the processes; after K steps the parameters and the rebuilt unsharded state (``full_state``, on every
process) must be those of the unsharded optimizer on one process over the whole batch: Adam (fused), Adam
with L2 weight decay and a global-norm clip that fires, AdamW with a clip, SGD with momentum, weight decay
and a step schedule, SGD with momentum and a global-norm clip, SGD with Nesterov momentum and an element
clip, Adam after a per-tensor norm clip, SGD with adaptive (unit-wise) clipping and a name exclusion, Adam
with a global-norm clip on all but the split tensor (frozen by name), and an optimizer with a user-written
per-tensor transform (kept whole). The shards cut tensors into blocks of rows (dense1.weight on 2 and 3
processes, a conv weight in the AGC run), so these runs check the split too.
Then the unsharded state of the 2-process run is cut into shards for 3 processes and for 1, and both
continue as the uninterrupted run does. Everything is float64; tolerance 1e-9 relative, 1e-11 absolute
(the gradients differ from the one-process ones by the order of the sums only, and a split tensor's norm
by the order of its sum of squares).
"""

import pytest
import torch

from spawn_ranks import run_ranks

from convdescent import optim
from convdescent.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from convdescent.losses import SoftmaxCrossEntropy
from convdescent.model import Sequential
from convdescent.models import resnet8, seed_cnn
from convdescent.optim.masked import freeze

TOL = dict(rtol=1e-9, atol=1e-11)
DT = torch.float64
K = 4  # steps per phase
BATCH = 12  # the global batch; each of N processes takes BATCH / N

CLIP_NORM = 1e-3  # below every row block's gradient norm, so clip_by_norm rescales each piece


def normalize_each_tensor():
    """A user-written transform (no TransformInfo) that divides each gradient tensor by its own norm."""

    def init(params):
        return ()

    def update(grads, state, params=None):
        return {k: g / g.norm().clamp(min=1e-12) for k, g in grads.items()}, state

    return optim.GradientTransformation(init, update)


CONFIGS = {
    "adam": lambda: optim.adam(lr=1e-2),
    "adam_l2_clip": lambda: optim.make_optimizer("adam", lr=1e-2, weight_decay=1e-2, clip_norm=0.05, record=True),
    "adamw_clip": lambda: optim.make_optimizer("adamw", lr=1e-2, weight_decay=0.1, clip_norm=0.05),
    "sgd_momentum": lambda: optim.sgd(lr=optim.step_decay(0.1, 2, 0.5), momentum=0.9, weight_decay=1e-3),
    "sgd_momentum_clip_norm": lambda: optim.make_optimizer("sgd", lr=0.1, momentum=0.9, clip_norm=0.05,
                                                           record=True),
    "sgd_nesterov_clip_value": lambda: optim.make_optimizer("sgd", lr=0.05, momentum=0.9, nesterov=True,
                                                            clip_value=0.01, record=True),
    "adam_clip_by_norm": lambda: optim.record_norms(optim.chain(optim.clip_by_norm(CLIP_NORM), optim.adam(lr=1e-2))),
    "sgd_agc": lambda: optim.make_optimizer("sgd", lr=0.1, momentum=0.9, agc=0.01, agc_exclude=["dense1.weight"],
                                            record=True),
    "adam_clip_frozen_split": lambda: freeze(optim.make_optimizer("adam", lr=1e-2, clip_norm=0.05), ["dense1.weight"]),
    "user_per_tensor": lambda: optim.chain(normalize_each_tensor(), optim.sgd(lr=0.05, momentum=0.9)),
}


def make_model(name: str = ""):
    """The test CNN; for the AGC run one whose conv weight (contiguous rows, unlike the dense weights) is
    the largest tensor, so that it is the one cut into row blocks."""
    if name == "sgd_agc":
        return Sequential([Conv2D(32, 3), ReLU(), Flatten(), Dense(3)], input_shape=(1, 3, 3), seed=0, dtype=DT)
    return Sequential([Conv2D(4, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(8), ReLU(), Dense(3)],
                      input_shape=(1, 8, 8), seed=0, dtype=DT)


def batches(name: str = ""):
    gen = torch.Generator().manual_seed(3)
    side = 3 if name == "sgd_agc" else 8
    x = torch.randn(2 * K, BATCH, 1, side, side, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (2 * K, BATCH), generator=gen)
    return x, y


def gradients(model, x, y):
    logits = model.forward(x, train=True)
    _, dl = SoftmaxCrossEntropy()(logits, y)
    model.backward(dl)
    return model.grads()


def reference(name: str, steps: int):
    """The unsharded optimizer on one process over the whole batch: parameters and state after ``steps``."""
    model, opt = make_model(name), CONFIGS[name]()
    params = model.params()
    state = opt.init(params)
    x, y = batches(name)
    for t in range(steps):
        state = optim.update_and_apply(opt, params, gradients(model, x[t], y[t]), state)
    return {k: v.clone() for k, v in params.items()}, optim.state_dict(state)


# ----- what each process runs -----------------------------------------------------------------------------

def _train(name, zopt, model, state, world, rank, steps):
    x, y = batches(name)
    n = BATCH // world
    for t in steps:
        grads = gradients(model, x[t, rank * n:(rank + 1) * n], y[t, rank * n:(rank + 1) * n])
        state = zopt.step(model.params(), grads, state)
    return state


def _worker(rank: int, world: int, out_dir: str, resume_dir: str | None) -> None:
    import warnings

    import torch.distributed as dist

    from convdescent.distributed.zero import ShardedOptimizer, state_nbytes

    out = {"fresh": {}, "resumed": {}, "resumed_alone": {}, "owned": {}, "bytes": {}, "sizes": {}, "errors": [],
           "warnings": {}}
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
    # A transform this package cannot vouch for on row blocks: whole tensors are the only choice.
    try:
        ShardedOptimizer(CONFIGS["user_per_tensor"](), make_model().params(), split=True)
        out["errors"].append(None)
    except ValueError as e:
        out["errors"].append(str(e))
    for name, make in CONFIGS.items():
        model = make_model(name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            zopt = ShardedOptimizer(make(), model.params())
        out["warnings"][name] = [str(w.message) for w in caught]
        out["owned"][name] = [tuple(p) for p in zopt.owned]  # (name, start, stop, whole); plain for torch.load
        state = _train(name, zopt, model, zopt.init(model.params()), world, rank, range(K))
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
                model = make_model(name)
                model.load_state_dict(ckpt["params"])
                # The user-written transform keeps whole tensors; split=False says so without the warning.
                zopt = ShardedOptimizer(make(), model.params(), group=group,
                                        split=False if name == "user_per_tensor" else None)
                state = _train(name, zopt, model, zopt.shard_state(ckpt["full"]), zopt.world_size, zopt.rank,
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
            for split in (True, False):
                zopt = ShardedOptimizer(optim.adam(), params, group=group, split=split)
                out["bytes"][(model_name, n, split)] = state_nbytes(zopt.init(params))
                out["sizes"][(model_name, n, split)] = zopt.sizes
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

def rows_of(t: torch.Tensor) -> int:
    return t.shape[0] if t.dim() else 1


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_sharded_run_matches_the_unsharded_one(runs, world, name):
    params_ref, state_ref = reference(name, K)
    for out in runs[world]:
        got = out["fresh"][name]
        for k, v in params_ref.items():
            torch.testing.assert_close(got["params"][k], v, **TOL, msg=k)
        assert_state_close(got["full"], state_ref)
    # The pieces cover every row of every tensor once; a process holds at most one piece of a tensor.
    shards = [out["owned"][name] for out in runs[world]]
    assert all(shards)
    for k, v in params_ref.items():
        held = sorted((start, stop, whole) for shard in shards for n, start, stop, whole in shard if n == k)
        assert held[0][0] == 0 and held[-1][1] == rows_of(v), k
        assert all(a[1] == b[0] for a, b in zip(held, held[1:])), k
        assert all(whole == (len(held) == 1) for _, _, whole in held), k
    for shard in shards:
        assert len({piece[0] for piece in shard}) == len(shard)
    split = {n for shard in shards for n, _, _, whole in shard if not whole}
    if name == "user_per_tensor":
        assert not split  # kept whole, with a warning (below)
    else:
        # These runs do exercise cut tensors: the dense layer (rows not contiguous), the conv weight for AGC.
        assert ("conv1.weight" if name == "sgd_agc" else "dense1.weight") in split


@pytest.mark.parametrize("world", [2, 3])
def test_refusals_name_what_is_wrong(runs, world):
    for out in runs[world]:
        too_few, bad_names, split_refused = out["errors"]
        assert too_few == (f"sharding the optimizer needs a share of the parameters on every process: the model's "
                           f"{world - 1} tensors make {world - 1} pieces for {world} processes (only tensors of 2 "
                           f"or more dims are cut, by rows); use fewer processes or do not shard the optimizer")
        assert bad_names is not None and "grads must have the names it was built with" in bad_names
        assert "missing ['conv1.bias'" in bad_names
        assert split_refused is not None and split_refused.startswith(
            "ShardedOptimizer(split=True): <user-written transform> may take values over whole tensors")
        # The user-written transform keeps tensors whole, and says so; the package's optimizers say nothing.
        assert len(out["warnings"]["user_per_tensor"]) == 1
        assert "every parameter tensor stays whole on one process" in out["warnings"]["user_per_tensor"][0]
        assert all(not w for n, w in out["warnings"].items() if n != "user_per_tensor")


def test_the_clips_fire_so_the_global_norm_matters():
    """Clipping by a local norm would give other parameters: make sure the clips do act in these runs."""
    for name in ("adam_l2_clip", "sgd_momentum_clip_norm", "sgd_nesterov_clip_value", "adam_clip_by_norm",
                 "sgd_agc"):
        _, state = reference(name, K)
        assert int(state["clipped_steps"]) == K, name
    # adamw_clip's clip (not recorded): the state keeps the last step's flag.
    _, state = reference("adamw_clip", K)
    assert bool(state["0"]["fired"])
    # clip_by_norm: every row block of the split dense1.weight has a norm above the bound, so clipping each
    # block by its own norm would differ from clipping the tensor by the norm of all its rows.
    model = make_model()
    x, y = batches()
    g = gradients(model, x[0], y[0])["dense1.weight"]
    for blocks in (g[:4], g[4:]), (g[:2], g[2:5], g[5:]):
        assert all(float(b.norm()) > CLIP_NORM for b in blocks)


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
    """Adam's state bytes per process for N = 1, 2, 3, cut into row blocks and (split=False) whole tensors
    only. The table: ``pytest -s -k shrinks tests/test_distributed_zero.py``."""
    per, sizes = {}, {}
    for world in (2, 3):
        for out in runs[world]:
            for key, b in out["bytes"].items():
                per.setdefault(key, []).append(b)
                sizes.setdefault(key, []).append(out["sizes"][key])
    print("\nAdam optimizer state, bytes per process (float32; rank 0, 1, ...)")
    for model, build in (("seed_cnn", seed_cnn), ("resnet8", resnet8)):
        params = build(seed=0).params()
        total = optim.state_dict(optim.adam().init(params))
        full = sum(t.numel() * t.element_size() for t in (*total["0"]["mu"].values(), *total["0"]["nu"].values()))
        for split in (True, False):
            assert per[(model, 1, split)] == [full]
        for n in (2, 3):
            split_sizes, whole_sizes = per[(model, n, True)], per[(model, n, False)]
            print(f"{model} N={n}: rows cut {split_sizes} (largest {max(split_sizes) / full:.3f} of {full}); "
                  f"whole tensors only {whole_sizes} (largest {max(whole_sizes) / full:.3f})")
            assert sum(split_sizes) == full and sum(whole_sizes) == full
            # Each process keeps about 1/N of the state: within 5% plus one small tensor.
            assert max(split_sizes) <= full / n * 1.05 + 4096, (model, n, split_sizes)
            # The bytes are those of the shards' elements: two float32 moments per element.
            for key in ((model, n, True), (model, n, False)):
                assert len({tuple(s) for s in sizes[key]}) == 1  # every process computed the same split
                assert sorted(per[key]) == sorted(e * 2 * 4 for e in sizes[key][0])
        print(f"{model} N=1: {full}")
    # Whole tensors alone cannot balance the tutorial CNN: its dense1.weight holds 99.7% of the parameters.
    assert max(per[("seed_cnn", 2, False)]) > 0.99 * full_of("seed_cnn")


def full_of(model: str) -> int:
    params = (seed_cnn if model == "seed_cnn" else resnet8)(seed=0).params()
    return sum(p.numel() for p in params.values()) * 2 * 4


def test_partition_is_balanced_deterministic_and_exact():
    from convdescent.distributed.zero import Piece, partition

    # Whole tensors only (1-d ones, or split=False): greedy by size, largest first.
    sizes = {"a": 10, "b": 7, "c": 7, "d": 3, "e": 1, "f": 1}
    shapes = {k: (v,) for k, v in sizes.items()}
    names = lambda shards: [[p.name for p in s] for s in shards]  # noqa: E731
    assert names(partition(shapes, 3)) == [["a"], ["b", "d"], ["c", "e", "f"]]
    assert partition(shapes, 3) == partition(dict(shapes), 3)
    assert names(partition(shapes, 1)) == [list(sizes)]
    assert all(p.whole for s in partition(shapes, 3) for p in s)
    # Tensors of 2+ dims are cut along dim 0 into consecutive row blocks that level the shards.
    shapes = {"w": (10, 6), "b": (10,), "v": (4, 2, 3)}
    shards = partition(shapes, 2)
    # b (whole) goes first to shard 0; the level is (10 + 60 + 24) / 2 = 47, so shard 0 takes 37 elements of
    # w, rounded to 6 rows of 6, and shard 1 the rest: 46 and 48 elements.
    assert shards == [[Piece("w", 0, 6, False), Piece("b", 0, 10, True)],
                      [Piece("w", 6, 10, False), Piece("v", 0, 4, True)]]
    assert partition(shapes, 2, split=False) == [[Piece("w", 0, 10, True)],
                                                 [Piece("b", 0, 10, True), Piece("v", 0, 4, True)]]
    # Three shards of a single matrix: rows 0-3, 3-7, 7-10 (cuts at the row nearest to 10/3 and 20/3).
    assert partition({"w": (10, 4)}, 3) == [[Piece("w", 0, 3, False)], [Piece("w", 3, 7, False)],
                                            [Piece("w", 7, 10, False)]]
    # More processes than rows: some shards are empty (the optimizer refuses that).
    assert partition({"w": (2, 4)}, 3) == [[Piece("w", 0, 1, False)], [], [Piece("w", 1, 2, False)]]
    with pytest.raises(ValueError, match="positive int"):
        partition(shapes, 0)


def test_only_transforms_exact_on_row_blocks_let_tensors_be_cut():
    from convdescent.optim.sharding import row_block_blockers

    for name in CONFIGS:
        if name != "user_per_tensor":
            assert row_block_blockers(CONFIGS[name]()) == [], name
    assert row_block_blockers(CONFIGS["user_per_tensor"]()) == ["<user-written transform>"]
    for name in optim.OPTIMIZERS:
        assert row_block_blockers(optim.make_optimizer(name, clip_norm=1.0, agc=0.01, record=True)) == [], name


def test_sharded_optimizer_needs_a_process_group():
    from convdescent.distributed.zero import ShardedOptimizer

    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedOptimizer(optim.adam(), make_model().params())
