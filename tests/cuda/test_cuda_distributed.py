"""Data-parallel workers on the GPU: NCCL in a group of one (the machine these run on has one GPU) and two
ranks over gloo with CUDA tensors, both against one process on the same device at the same global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist

from convdescent import SoftmaxCrossEntropy, seed_cnn
from convdescent.distributed import GradientReducer, free_port
from convdescent.distributed.syncbn import sync_batchnorm
from convdescent.distributed.zero import ShardedOptimizer
from convdescent.optim import make_optimizer, update_and_apply
from convdescent.train import train_from_config
from convdescent.train.step import compute_gradients
from test_distributed import _base, _gap, _torchrun, _weights, data  # noqa: F401  (data is a fixture)

CUDA = torch.device("cuda")


def _batch(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g).to(CUDA), (torch.arange(n) % 10).to(CUDA)


def test_nccl_group_of_one_reduces_buckets_syncs_batch_norm_and_shards_the_optimizer_on_the_device():
    """Every collective convdescent issues, on NCCL with CUDA tensors: the bucketed gradient all-reduce, synced
    batch norm's statistics and the sharded optimizer's reduce/broadcast. In a group of one each must leave the
    numbers of one process unchanged."""
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            device_id=CUDA)
    try:
        model = seed_cnn(seed=0).to(device=CUDA)
        reducer = GradientReducer(model, bucket_mb=25.0)
        x, y = _batch()
        reducer.begin()
        reducer.set_numbers(torch.tensor([1.5, 7.0, 0.0, 1.0, 0.0], device=CUDA))
        _, _, grads = compute_gradients(model, SoftmaxCrossEntropy(), x, y)
        expected = {k: g.clone() for k, g in grads.items()}
        reduced, numbers = reducer.finish()
        assert numbers.tolist() == [1.5, 7.0, 0.0, 1.0, 0.0]
        for k in expected:
            assert reduced[k].device.type == CUDA.type and torch.equal(reduced[k], expected[k]), k
        reducer.close()

        from convdescent import BatchNorm2D, Conv2D, Dense, Flatten, ReLU, Sequential

        def bn_net():
            return Sequential([Conv2D(4, 3), BatchNorm2D(), ReLU(), Flatten(), Dense(10)], input_shape=(1, 28, 28),
                              seed=1).to(device=CUDA)

        synced, plain = bn_net(), bn_net()
        assert sync_batchnorm(synced) == 1
        for net in (synced, plain):
            compute_gradients(net, SoftmaxCrossEntropy(), x, y)
        for k, g in plain.grads().items():
            torch.testing.assert_close(synced.grads()[k], g, rtol=1e-5, atol=1e-6)
        for k, b in plain.state_dict().items():
            torch.testing.assert_close(synced.state_dict()[k], b, rtol=1e-5, atol=1e-6)

        sharded_model, plain_model = seed_cnn(seed=2).to(device=CUDA), seed_cnn(seed=2).to(device=CUDA)
        opt_a, opt_b = make_optimizer("adam", lr=1e-2), make_optimizer("adam", lr=1e-2)
        sharded = ShardedOptimizer(opt_a, sharded_model.params())
        state_a, state_b = sharded.init(sharded_model.params()), opt_b.init(plain_model.params())
        for step in range(4):
            xb, yb = _batch(seed=step)
            _, _, ga = compute_gradients(sharded_model, SoftmaxCrossEntropy(), xb, yb)
            state_a = sharded.step(sharded_model.params(), ga, state_a)
            _, _, gb = compute_gradients(plain_model, SoftmaxCrossEntropy(), xb, yb)
            state_b = update_and_apply(opt_b, plain_model.params(), gb, state_b)
        for k, p in plain_model.params().items():
            torch.testing.assert_close(sharded_model.params()[k], p, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_sharing_the_gpu_train_as_one_process_on_it(data, tmp_path):  # noqa: F811
    """Two ranks on one GPU (gloo carries the CUDA tensors): SGD with a global-norm clip, Adam, and Adam with a
    sharded optimizer end with the weights one process on the GPU reaches at the same global batch."""
    cuda = dict(device="cuda", tf32=False, cuda_graph=False)
    sgd = _base(data, optimizer="sgd", momentum=0.9, lr=0.05, clip_norm=0.5, **cuda)
    adam = _base(data, optimizer="adam", lr=0.003, **cuda)
    configs = {"sgd": dict(sgd, backend="gloo"), "adam": dict(adam, backend="gloo"),
               "zero": dict(adam, backend="gloo", shard_optimizer=True)}
    _torchrun(2, [{"config": c, "run_dir": str(tmp_path / f"{k}2")} for k, c in configs.items()], tmp_path)
    one = {k: train_from_config(c, run_dir=tmp_path / f"{k}1", display="none").model.state_dict()
           for k, c in {"sgd": sgd, "adam": adam}.items()}
    one["zero"] = one["adam"]
    for key in configs:
        assert _gap(_weights(tmp_path / f"{key}2"), one[key]) < 1e-4, key
