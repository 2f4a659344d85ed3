"""``convdescent train --nproc N``: N local workers started by torch's elastic launcher (what torchrun runs).

The launcher process only supervises: it starts ``python -m convdescent <the same arguments>`` N times with
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so each
worker finds its place exactly as under ``torchrun``. It watches them (every 0.1 s): when one dies, the others
are stopped and the launcher names the lost rank and exits non-zero; SIGINT/SIGTERM to the launcher are
passed to every worker, which finish their step together, rank 0 writing one checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import uuid

from .world import DistributedError, free_port, port_in_use

EXIT_LOST = 1


def _quiet_torch_logs() -> None:
    """The launcher's own log lines (workers started, signals forwarded) would only repeat what
    convdescent says; torch's modules set their loggers' levels themselves, so each is set here."""
    prefixes = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run")
    names = [n for n in logging.root.manager.loggerDict if n.startswith(prefixes)]
    for name in set(names) | set(prefixes):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def describe_failures(failures: dict) -> tuple[str | None, int]:
    """(message, exit status) for the workers that failed: a worker killed by a signal is named as the lost
    rank (message); workers that ended with their own error already said why (no message, rank 0's status)."""
    killed = {r: f for r, f in failures.items() if f.exitcode < 0 and f.exitcode != -signal.SIGTERM}
    if killed:
        rank = min(killed, key=lambda r: killed[r].timestamp)
        f = killed[rank]
        return (f"worker rank {rank} (pid {f.pid}) died (killed by {_signal_name(f.exitcode)}), so every worker "
                f"of the run was stopped; the run's last checkpoint is kept (convdescent train --resume RUN_DIR)",
                EXIT_LOST)
    # rank 0's own status when it ended by itself, else the first rank's that did (the others were stopped)
    codes = [failures[r].exitcode for r in sorted(failures) if failures[r].exitcode > 0]
    return None, codes[0] if codes else EXIT_LOST


def launch_local(argv: list[str], nproc: int, threads: int | None = None) -> int:
    """Run ``convdescent <argv>`` on ``nproc`` local workers; returns the exit status for the launcher.

    The rendezvous listens on 127.0.0.1 at $MASTER_PORT when it is set (refused when the port is taken),
    else on a free port.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    host = os.environ.get("MASTER_ADDR") or "127.0.0.1"
    if os.environ.get("MASTER_PORT"):
        try:
            port = int(os.environ["MASTER_PORT"])
        except ValueError:
            raise DistributedError(f"MASTER_PORT={os.environ['MASTER_PORT']!r} is not a port number") from None
        if port_in_use(host, port):
            raise DistributedError(f"port {port} on {host} (MASTER_PORT) is already in use; free it or choose "
                                   f"another MASTER_PORT (unset, a free port is chosen)")
    else:
        port = free_port(host)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads or 1))
    _quiet_torch_logs()
    with tempfile.TemporaryDirectory(prefix="convdescent-launch-") as logs:
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"convdescent-{uuid.uuid4().hex[:8]}",
                              rdzv_backend="c10d", rdzv_endpoint=f"{host}:{port}", rdzv_configs={"timeout": 120},
                              max_restarts=0, monitor_interval=0.1, start_method="spawn",
                              logs_specs=DefaultLogsSpecs(log_dir=logs))
        try:
            elastic_launch(config, sys.executable)("-m", "convdescent", *argv)
        except ChildFailedError as e:
            message, status = describe_failures(e.failures)
            if message:
                print(f"convdescent: error: {message}", file=sys.stderr, flush=True)
            return status
        except SignalException as e:
            return 128 + int(e.sigval)
    return 0
