"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one torch thread, restoring the previous count afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def builtin_sections_only():
    """Let a module's reports hold only the built-in sections (others are tested with their own modules)."""
    import convdescent.report as report

    saved = report.SECTIONS, report.SECTION_MODULES
    report.SECTIONS, report.SECTION_MODULES = [], []
    yield
    report.SECTIONS, report.SECTION_MODULES = saved


@pytest.fixture(scope="module")
def bands_npz(tmp_path_factory):
    """``npz:PATH`` of a small 4-class dataset (class = a bright band) that seed_cnn learns in one epoch."""
    import numpy as np

    from convdescent.data.synthetic import synthetic_images

    x, y = synthetic_images(240, 4, (1, 8, 8), seed=0)
    xt, yt = synthetic_images(40, 4, (1, 8, 8), seed=1)
    path = tmp_path_factory.mktemp("data") / "bands.npz"
    np.savez(path, x_train=x.numpy(), y_train=y.numpy(), x_test=xt.numpy(), y_test=yt.numpy())
    return f"npz:{path}"
