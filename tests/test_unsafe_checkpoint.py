"""A file that is not a safe convdescent checkpoint is refused by every command that reads a run, with a
message that says so and never suggests turning off torch's safe loader; the file's code never runs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from convdescent.cli import main
from convdescent.train import CheckpointError, load_checkpoint
from convdescent.train.run import train_from_config

pytestmark = pytest.mark.usefixtures("one_thread")


class Planted:
    """Unpickling this object opens (creates) a marker file: proof that the file's code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def hostile_run(bands_npz, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    res = train_from_config({"model": "seed_cnn", "dataset": bands_npz, "val_split": 40, "epochs": 1,
                             "out": str(root), "name": "r", "log_every": 0, "health_every": 0},
                            display="none")
    run = root / "copy"
    shutil.copytree(res.run_dir, run)
    marker = root / "code-ran"
    pts = sorted((run / "checkpoints").glob("*.pt"))
    assert {p.name for p in pts} >= {"best.pt", "last.pt"}
    for p in pts:
        ckpt = torch.load(p, weights_only=True)
        ckpt["model"]["planted"] = Planted(marker)
        torch.save(ckpt, p)
    image = root / "img.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(image)
    return run, marker, image


def commands(run, image):
    return {
        "resume": ["train", "--resume", str(run), "--epochs", "2", "--no-report"],
        "evaluate": ["evaluate", str(run)],
        "evaluate-last": ["evaluate", str(run), "--checkpoint", "last"],
        "predict": ["predict", str(run), str(image)],
        "report": ["report", str(run)],
        "filters": ["filters", str(run)],
        "explain": ["explain", str(run), "--test-index", "0"],
        "landscape": ["landscape", str(run), "--line-points", "2", "--plane-points", "0", "--examples", "8"],
        "gradcheck": ["gradcheck", "--run", str(run), "--no-layer-types"],
        "border": ["border", "--run", str(run), "--examples", "4"],
    }


@pytest.mark.parametrize("name", list(commands("RUN", "IMG")))
def test_every_command_reading_a_run_refuses_a_hostile_checkpoint(hostile_run, name, capsys):
    run, marker, image = hostile_run
    argv = commands(run, image)[name]
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, (name, err)
    assert err.startswith("convdescent:") and "not a safe convdescent checkpoint" in err, err
    assert "weights_only" not in err and "weights only" not in err.lower() and "Traceback" not in err, err
    assert not marker.exists()


def test_the_message_names_the_offending_global_and_hides_torchs_advice(hostile_run):
    run, marker, _ = hostile_run
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(run / "checkpoints" / "last.pt")
    msg = str(info.value)
    assert "not a safe convdescent checkpoint" in msg and "open" in msg
    assert "weights_only" not in msg and not marker.exists()
