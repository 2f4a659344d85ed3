"""Time one optimizer update of the tutorial CNN's parameters (and of a model ten times larger):
convdescent.optim (update + apply_updates) against torch.optim's foreach implementation, in one run.

Usage:
    python benchmarks/optim_step.py [--steps 60] [--reps 5] [--threads 2] [--device cpu] [--only adam,sgd]
                                    [--model both|tutorial|10x]

Prints, per optimizer and model: our median microseconds per step, torch's, and the ratio ours/torch
(below 1.0 means we are faster). The "fused" rows time ``optim.update_and_apply`` (one fused kernel for
Adam and AdamW, what train_step uses) against torch's foreach and fused (``fused=True``) Adam/AdamW. The two sides are stepped alternately and the ratio is the median of the
per-step ratios, which keeps it steady when other processes load the machine; "min ratio" compares the
fastest step of each side, an estimate of the cost without interference. torch.optim has no Lion; its peer is a hand-written foreach Lion that
follows the paper's pseudo-code, labelled as such.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convdescent import optim  # noqa: E402


def tutorial_shapes(width: int = 128) -> dict[str, tuple[int, ...]]:
    """The tutorial CNN's parameters: conv 3x3x32 on 28x28 -> pool -> dense(width) -> dense(10)."""
    return {
        "conv1.weight": (32, 1, 3, 3), "conv1.bias": (32,),
        "dense1.weight": (width, 5408), "dense1.bias": (width,),
        "dense2.weight": (10, width), "dense2.bias": (10,),
    }


class LionForeach(torch.optim.Optimizer):
    """Peer for Lion: the paper's update (Chen et al. 2023, Alg. 2) written with torch._foreach ops."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            gs = [p.grad for p in ps]
            ms = []
            for p in ps:
                st = self.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(p)
                ms.append(st["exp_avg"])
            b1, b2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            if wd:
                torch._foreach_mul_(ps, 1 - lr * wd)
            update = torch._foreach_mul(ms, b1)
            torch._foreach_add_(update, gs, alpha=1 - b1)
            torch._foreach_sign_(update)
            torch._foreach_add_(ps, update, alpha=-lr)
            torch._foreach_mul_(ms, b2)
            torch._foreach_add_(ms, gs, alpha=1 - b2)


# name shown, our builder kwargs, torch class, torch kwargs
CASES = [
    ("gd", ("gd", {"lr": 1e-3}), torch.optim.SGD, {"lr": 1e-3}),
    ("sgd momentum", ("sgd", {"lr": 1e-3, "momentum": 0.9}), torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9}),
    ("sgd nesterov wd", ("sgd", {"lr": 1e-3, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}),
     torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}),
    ("rmsprop", ("rmsprop", {}), torch.optim.RMSprop, {}),
    ("rmsprop centered mom", ("rmsprop", {"centered": True, "momentum": 0.9}), torch.optim.RMSprop,
     {"centered": True, "momentum": 0.9}),
    ("adagrad", ("adagrad", {}), torch.optim.Adagrad, {}),
    ("adadelta", ("adadelta", {}), torch.optim.Adadelta, {}),
    ("adam", ("adam", {}), torch.optim.Adam, {}),
    ("adam amsgrad", ("adam", {"amsgrad": True}), torch.optim.Adam, {"amsgrad": True}),
    ("adamw", ("adamw", {}), torch.optim.AdamW, {}),
    ("nadam", ("nadam", {}), torch.optim.NAdam, {}),
    ("lion (peer: foreach Lion)", ("lion", {"weight_decay": 0.1}), LionForeach, {"weight_decay": 0.1}),
]


# update_and_apply (one fused kernel for Adam/AdamW) against torch's foreach and fused implementations
FUSED_CASES = [
    ("adam fused vs foreach", ("adam", {}), torch.optim.Adam, {"foreach": True}),
    ("adam fused vs fused", ("adam", {}), torch.optim.Adam, {"fused": True}),
    ("adamw fused vs foreach", ("adamw", {}), torch.optim.AdamW, {"foreach": True}),
    ("adamw fused vs fused", ("adamw", {}), torch.optim.AdamW, {"fused": True}),
]


def _grad_pool(shapes, device, n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=gen).to(device) * 1e-2 for k, s in shapes.items()} for _ in range(n)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_case(case, shapes, steps, reps, device, fused=False):
    """Median microseconds per step for ours and the peer, and the median of paired ratios; the two are
    stepped alternately so that changes in machine load fall on both alike. ``fused``: ours steps with
    ``optim.update_and_apply`` and the peer keeps the kwargs it is given."""
    label, (name, ours_hp), cls, torch_hp = case
    gen = torch.Generator().manual_seed(1)
    init = {k: (torch.randn(s, generator=gen) * 0.05).to(device) for k, s in shapes.items()}
    pool = _grad_pool(shapes, device)
    keys = list(init)
    params = {k: v.clone() for k, v in init.items()}
    tensors = [torch.nn.Parameter(v.clone()) for v in init.values()]
    kwargs = dict(torch_hp)
    if cls is not LionForeach and not fused:
        kwargs["foreach"] = True
    peer = cls(tensors, **kwargs)
    tx = optim.make_optimizer(name, **ours_hp)
    state = tx.init(params)
    ours, theirs = [], []
    warmup = 5
    for i in range(warmup + steps * reps):
        g = pool[i % len(pool)]
        grads = {k: v.clone() for k, v in g.items()}
        _sync(device)
        t0 = time.perf_counter()
        if fused:
            state = optim.update_and_apply(tx, params, grads, state)
        else:
            updates, state = tx.update(grads, state, params)
            optim.apply_updates(params, updates)
        _sync(device)
        t1 = time.perf_counter()
        for t, k in zip(tensors, keys):
            t.grad = g[k].clone()
        _sync(device)
        t2 = time.perf_counter()
        peer.step()
        _sync(device)
        t3 = time.perf_counter()
        if i >= warmup:
            ours.append(t1 - t0)
            theirs.append(t3 - t2)
    paired = statistics.median(a / b for a, b in zip(ours, theirs))
    return statistics.median(ours) * 1e6, statistics.median(theirs) * 1e6, paired, min(ours) / min(theirs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="timed steps per repetition")
    ap.add_argument("--reps", type=int, default=5, help="repetitions (steps * reps steps are timed per side)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default="", help="comma-separated optimizer names to run (e.g. adam,sgd)")
    ap.add_argument("--model", choices=("both", "tutorial", "10x"), default="both", help="which model to time")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    models = [("tutorial CNN", tutorial_shapes(128)), ("10x CNN", tutorial_shapes(1280))]
    models = [m for m, key in zip(models, ("tutorial", "10x")) if args.model in ("both", key)]
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"median of {args.steps * args.reps} steps per side")
    worst = 0.0
    for model_name, shapes in models:
        n = sum(torch.Size(s).numel() for s in shapes.values())
        print(f"\n{model_name}: {n:,} parameters")
        print(f"{'optimizer':<28}{'ours us/step':>14}{'torch us/step':>15}{'ratio':>8}{'min ratio':>12}")
        for case in CASES:
            if only and case[1][0] not in only:
                continue
            ours, theirs, ratio, best = bench_case(case, shapes, args.steps, args.reps, device)
            worst = max(worst, ratio)
            print(f"{case[0]:<28}{ours:>14.1f}{theirs:>15.1f}{ratio:>8.2f}{best:>12.2f}")
        for case in FUSED_CASES:
            if only and case[1][0] not in only:
                continue
            ours, theirs, ratio, best = bench_case(case, shapes, args.steps, args.reps, device, fused=True)
            print(f"{case[0]:<28}{ours:>14.1f}{theirs:>15.1f}{ratio:>8.2f}{best:>12.2f}")
    print(f"\nworst ratio ours/torch (update + apply_updates rows): {worst:.2f}")


if __name__ == "__main__":
    main()
