"""Trainings run by every rank of a torchrun launch, in one process group (used by test_distributed.py).

    python -m torch.distributed.run --nproc-per-node N tests/dist_jobs.py JOBS.json

JOBS.json holds a list of {"config": {...}, "run_dir": PATH} or {"config": {...}, "resume": PATH}; each is trained with ``train_from_config``
on every rank, one after the other, in the same process group (so a test pays the start-up once).
"""

import json
import sys

import torch.distributed as dist

from convdescent.train import train_from_config


def main(path: str) -> int:
    jobs = json.loads(open(path, encoding="utf-8").read())
    dist.init_process_group("gloo")
    try:
        for job in jobs:
            train_from_config(job["config"], run_dir=job.get("run_dir"), resume=job.get("resume"), display="none")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
