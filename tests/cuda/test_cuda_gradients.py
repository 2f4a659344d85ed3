"""Every layer's explicit backward on CUDA against torch autograd on CUDA, over the CPU suite's random cases."""

from __future__ import annotations

import pytest
import torch

from test_layers_grad import AUTOGRAD_TOL, CASES, TORCH_OPS, build_case, reference, rel_error

DEVICE = torch.device("cuda")
# The native-kernel variants of the CPU suite are CPU-only; on CUDA every layer runs as torch CUDA ops.
CUDA_CASES = [pytest.param(name, case, id=case.id) for name, cases in CASES.items()
              if name not in TORCH_OPS and "(native)" not in name for case in cases]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layer_name,case", CUDA_CASES)
def test_cuda_backward_matches_cuda_autograd(layer_name, case, dtype):
    layer, x, r = build_case(case, dtype=dtype)
    layer.to(device=DEVICE)
    x, r = x.to(DEVICE), r.to(DEVICE)
    tol = AUTOGRAD_TOL[dtype]
    buffers = {n: b.clone() for n, b in layer.named_buffers()}
    y = layer.forward(x, case.train)
    dx = layer.backward(r)
    assert y.device.type == "cuda" and dx.device.type == "cuda"
    grads = {n: g.clone() for n, g in layer.named_grads()}
    leaves = {n: p.detach().clone().requires_grad_() for n, p in layer.named_params()}
    xr = x.clone().requires_grad_()
    with torch.enable_grad():
        yr = reference(layer, xr, leaves, buffers, case.train, y)
        (yr * r).sum().backward()
    assert rel_error(y, yr.detach()) <= tol, f"{case.id}: CUDA forward differs from torch"
    assert rel_error(dx, xr.grad) <= tol, f"{case.id}: CUDA dL/dx differs from autograd"
    assert set(grads) == set(leaves)
    for name, leaf in leaves.items():
        assert grads[name].device.type == "cuda"
        assert rel_error(grads[name], leaf.grad) <= tol, f"{case.id}: CUDA dL/d{name} differs from autograd"
