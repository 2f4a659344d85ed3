"""A search shared through PostgreSQL, as on several machines: two launchers with the same --study name.

The test starts a throwaway PostgreSQL server on 127.0.0.1 in a temporary folder (it needs the server
binaries, e.g. ``apt-get install postgresql``, and the psycopg2 driver from the ``test`` extra).
"""

import glob
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile

import numpy as np
import optuna
import pytest

from convdescent.data.synthetic import synthetic_images
from convdescent.search.space import point_key
from convdescent.search.study import open_storage


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)),
                                       None)
    if found is None:
        raise RuntimeError(f"the PostgreSQL server program {name!r} was not found; install the server "
                           f"(apt-get install postgresql) to run this test")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """postgresql:// URL of a server started for this test only, stopped and deleted afterwards."""
    root = tempfile.mkdtemp(prefix="cd-pg-")
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres account
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log, port = os.path.join(root, "data"), os.path.join(root, "log"), _free_port()
    subprocess.run(as_user + [_pg_bin("initdb"), "-D", data, "-A", "trust", "-U", "postgres", "--no-sync",
                              "-E", "UTF8"], check=True, capture_output=True)
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    subprocess.run(as_user + [_pg_bin("pg_ctl"), "-D", data, "-o", opts, "-l", log, "-w", "-t", "60", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_user + [_pg_bin("pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_launchers_sharing_a_postgresql_study_cover_the_grid_once(postgres_url, tmp_path):
    x, y = synthetic_images(200, 4, (1, 8, 8), seed=0)
    xt, yt = synthetic_images(40, 4, (1, 8, 8), seed=1)
    np.savez(tmp_path / "d.npz", x_train=x.numpy(), y_train=y.numpy(), x_test=xt.numpy(), y_test=yt.numpy())
    argv = [sys.executable, "-m", "convdescent.cli", "search", "--dataset", f"npz:{tmp_path / 'd.npz'}",
            "--val-split", "40", "--epochs", "1", "--lr", "1e-4:1e-1", "--optimizer", "sgd,adam",
            "--sampler", "grid", "--grid-points", "3", "--pruner", "none", "--storage", postgres_url,
            "--study", "shared"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(argv + ["--out", str(tmp_path / f"machine{i}")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = optuna.load_study(study_name="shared", storage=open_storage(postgres_url))
    trained = [t for t in study.get_trials() if "duplicate_of" not in t.user_attrs]
    keys = sorted(point_key(t.user_attrs["params"]) for t in trained)
    assert len(keys) == 6 and len(set(keys)) == 6
    assert all(t.state.name == "COMPLETE" for t in trained)
    # both launchers report the same complete study
    for i in range(2):
        summary = json.loads((tmp_path / f"machine{i}" / "search.json").read_text())
        assert summary["trials"] == 6 and summary["storage"].startswith("postgresql://")
    # each point was trained by exactly one of the two processes
    lines = [line for out in outputs for line in out.splitlines() if re.match(r"trial \d+ \[worker 0\]", line)]
    assert len(lines) == 6, outputs
