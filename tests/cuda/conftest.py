"""CUDA tests: collected only where torch sees a CUDA device (scripts/device-check.sh runs them on a GPU).

Everything device-independent is tested on the CPU by the rest of the suite; these files check what only a
GPU can show: the layers' gradients computed by CUDA kernels, the CUDA-graph step, checkpoints moving
between devices, a short training run, and data-parallel workers on the device.
"""

import os
import sys

import pytest
import torch

HAVE_CUDA = torch.cuda.is_available()

# Not a skip: without a GPU these files are not collected at all, as the project's test policy asks.
collect_ignore_glob = [] if HAVE_CUDA else ["test_*.py"]

# The CPU suite's case tables (tests/test_layers_grad.py) are reused here.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def exact_cuda_math():
    """TF32 off inside these tests: the gradients are compared with float32/float64 tolerances."""
    if not HAVE_CUDA:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
