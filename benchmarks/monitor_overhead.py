"""Cost of the gradient-health monitor: the same training run with the monitor on and off, in one process.

Both sides train the tutorial's CNN (seed_cnn) on Fashion-MNIST with Adam(1e-3) through ``convdescent.train.fit``,
from the same initial weights and batch order; the only difference is ``HealthMonitor(every=EVERY)`` in the
callbacks. Rounds alternate off/on so both see the same machine load; the printed figures are medians over
rounds. Two measures are printed:

- the ratio on/off of whole rounds, in wall-clock time and in this process's CPU time (the CPU time is far
  less disturbed by other jobs on a shared machine; use --threads 1 so it does not count spin-waiting),
  including everything the monitor changes, e.g. monitored steps taking the trainer's gradient-hook path;
- the time spent inside the monitor's hooks as a fraction of the run, timed directly;
- per-step times within the monitored runs: the median monitored step against the median plain step. Their
  difference is the whole cost of one check (activation statistics in forward, the hooks, the one host
  sync), and ``difference / (every * plain step)`` the overhead at that interval. Medians over hundreds of
  steps shrug off the load spikes that make whole rounds swing on a shared machine.

    python benchmarks/monitor_overhead.py [--steps 600] [--rounds 5] [--every 50] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from convdescent import SoftmaxCrossEntropy, seed_cnn
from convdescent.data import load_dataset
from convdescent.diagnostics.health import HealthMonitor
from convdescent.optim import make_optimizer
from convdescent.train import Callback, fit


class TimedMonitor(HealthMonitor):
    """The monitor with a stopwatch around each hook."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.hook_seconds = 0.0

    def _timed(name):
        def hook(self, *a, **kw):
            t0 = time.perf_counter()
            try:
                return getattr(HealthMonitor, name)(self, *a, **kw)
            finally:
                self.hook_seconds += time.perf_counter() - t0
        return hook

    on_gradients = _timed("on_gradients")
    on_step_end = _timed("on_step_end")
    on_train_begin = _timed("on_train_begin")
    on_train_end = _timed("on_train_end")


class StepTimer(Callback):
    """Wall time of every step, from one on_step_end to the next (the CPU runs each step synchronously)."""

    def __init__(self):
        self.last = None
        self.times = {}

    def on_step_end(self, trainer, step, logs):
        now = time.perf_counter()
        if self.last is not None:
            self.times[step] = now - self.last
        self.last = now


def one_round(data, steps, batch_size, monitor, timer=None):
    model = seed_cnn(input_shape=data[0].shape[1:], num_classes=10, seed=0)
    callbacks = ([monitor] if monitor is not None else []) + ([timer] if timer is not None else [])
    t0, c0 = time.perf_counter(), time.process_time()
    fit(model, SoftmaxCrossEntropy(), make_optimizer("adam", lr=1e-3), data, steps=steps, batch_size=batch_size,
        callbacks=callbacks, seed=0, verbose=0, handle_signals=False)
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="off/on pairs")
    ap.add_argument("--every", type=int, default=50, help="monitor interval (the default is 50)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_dataset("fashion-mnist", val_split=0)
    n = args.steps * args.batch_size
    data = (ds.x_train[:n], ds.y_train[:n])
    one_round(data, 20, args.batch_size, None)  # warm-up: allocator, kernels
    off, on, cpu_off, cpu_on, hooks = [], [], [], [], []
    checked, plain = [], []
    for r in range(args.rounds):
        wall, cpu = one_round(data, args.steps, args.batch_size, None)
        off.append(wall)
        cpu_off.append(cpu)
        mon = TimedMonitor(every=args.every, stream=None)
        timer = StepTimer()
        wall, cpu = one_round(data, args.steps, args.batch_size, mon, timer)
        for step, t in timer.times.items():
            (checked if step % args.every == 0 else plain).append(t)
        on.append(wall)
        cpu_on.append(cpu)
        hooks.append(mon.hook_seconds / on[-1])
        print(f"round {r + 1}: off {off[-1]:.2f} s ({cpu_off[-1]:.2f} s CPU), on {on[-1]:.2f} s "
              f"({cpu_on[-1]:.2f} s CPU), {len(mon.records)} checks, {mon.hook_seconds * 1e3:.0f} ms in the "
              f"monitor's hooks", flush=True)
    m_off, m_on = statistics.median(off), statistics.median(on)
    c_off, c_on = statistics.median(cpu_off), statistics.median(cpu_on)
    step_ms = m_off / args.steps * 1e3
    print(f"\nseed_cnn, Fashion-MNIST, batch {args.batch_size}, {args.steps} steps, monitor every {args.every} "
          f"steps, {torch.get_num_threads()} threads")
    print(f"median step time without the monitor: {step_ms:.2f} ms")
    print(f"median round, wall clock: off {m_off:.2f} s, on {m_on:.2f} s; ratio on/off {m_on / m_off:.4f} "
          f"({(m_on / m_off - 1) * 100:+.2f}%)")
    print(f"median round, process CPU time: off {c_off:.2f} s, on {c_on:.2f} s; ratio on/off {c_on / c_off:.4f} "
          f"({(c_on / c_off - 1) * 100:+.2f}%)")
    p_ms, c_ms = statistics.median(plain) * 1e3, statistics.median(checked) * 1e3
    print(f"per step, in the monitored runs: median plain step {p_ms:.2f} ms ({len(plain)} steps), median "
          f"checked step {c_ms:.2f} ms ({len(checked)} steps): one check costs {c_ms - p_ms:.2f} ms, an overhead "
          f"of {(c_ms - p_ms) / (args.every * p_ms) * 100:.2f}% at every={args.every} (target: at most 3%)")
    print(f"time inside the monitor's hooks: median {statistics.median(hooks) * 100:.2f}% of the run "
          f"(target: at most 3%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
