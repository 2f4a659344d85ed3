"""One-pass optimizer steps: ``update`` and ``apply_updates`` done by a single fused kernel.

Written as a chain of transforms, Adam's step is a dozen passes over every parameter (moments, square
root, bias corrections, the final ``addcdiv``), even with the deferred updates of
:mod:`convdescent.optim.updates`. On a 2-core CPU that is about 1.2 ms for the tutorial's CNN (694k
parameters), a quarter of a whole training step at batch 32. torch ships the same arithmetic as one fused
kernel per device (``torch._fused_adam_`` / ``torch._fused_adamw_``, what ``torch.optim.Adam(fused=True)``
runs): each element of the parameters, gradients and moments is read and written once, about 0.2 ms.

:func:`update_and_apply` uses that kernel when the optimizer is one of the chains it computes exactly (it
asks :func:`fused_step`, which recognises the chain's parts once and remembers the answer on the optimizer;
``chain`` itself knows nothing of kernels):

    [coupled_weight_decay] -> scale_by_adam -> scale_by_learning_rate        (Adam, L2 in the gradient)
    scale_by_adam -> [decoupled_weight_decay] -> scale_by_learning_rate      (AdamW)

with constant or scheduled learning rate and first-moment decay, AMSGrad or not, and everything else goes
through ``update`` then ``apply_updates``. The fused step leaves exactly the state ``update`` would (same
step counts, the same moment tensors updated in place); its parameters agree with the chain's to float
rounding (the kernel divides where the chain multiplies by reciprocals), and bit for bit with
``torch.optim.Adam(fused=True)``. The explicit chain stays the reference: tests check the two agree.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch

from .. import native
from ..layout import memory_order
from .base import GradientTransformation, apply_updates

# Set CONVDESCENT_FUSED=0 to run every step through update() + apply_updates() (for comparisons).
_ENABLED = os.environ.get("CONVDESCENT_FUSED", "1") != "0"


def _fusion_kernels():
    adam = getattr(torch, "_fused_adam_", None)
    adamw = getattr(torch, "_fused_adamw_", None)
    return adam, adamw


def _name(tx) -> str | None:
    info = getattr(tx, "info", None)
    return info.name if info is not None else None


def adam_fusion(parts: tuple) -> Callable | None:
    """A fused step for a chain's parts when they spell Adam or AdamW (see the module doc), else None.

    Args:
        parts: the flattened transforms of a chain, in order.

    Returns:
        ``fn(params, grads, state) -> new_state or None``; None from ``fn`` means "not here" (a device or
        dtype the kernel does not take), and the caller falls back to update + apply.
    """
    names = [_name(p) for p in parts]
    coupled = decoupled = None
    if names == ["scale_by_adam", "scale_by_learning_rate"]:
        i_adam, i_lr = 0, 1
    elif names == ["coupled_weight_decay", "scale_by_adam", "scale_by_learning_rate"]:
        coupled, i_adam, i_lr = parts[0], 1, 2
    elif names == ["scale_by_adam", "decoupled_weight_decay", "scale_by_learning_rate"]:
        decoupled, i_adam, i_lr = parts[1], 0, 2
    else:
        return None
    adam_kw = parts[i_adam].info.kwargs
    wd = float((coupled or decoupled).info.kwargs["weight_decay"]) if (coupled or decoupled) else 0.0
    return FusedAdam(i_adam, i_lr, len(parts), adam_kw["b1"], adam_kw["b2"], adam_kw["eps"],
                     bool(adam_kw.get("amsgrad", False)), parts[i_lr].info.lr_of, wd, decoupled is not None)


class FusedAdam:
    """The fused Adam/AdamW step of one chain (built by :func:`adam_fusion`).

    Calling it, ``fn(params, grads, state) -> new_state or None``, is the ordinary fused step. The other
    methods serve a step recorded once and replayed (:mod:`convdescent.train.graphs`): the learning rate
    and the step count come from device tensors filled before each step, and the host advances the
    counters afterwards, so the state matches the chain's exactly.
    """

    static = True

    def __init__(self, i_adam, i_lr, n_parts, b1, b2, eps, amsgrad, lr_of, wd, decoupled):
        self.i_adam, self.i_lr, self.n_parts = i_adam, i_lr, n_parts
        self.b1, self.b2, self.eps, self.amsgrad = b1, b2, eps, amsgrad
        self.lr_of, self.wd, self.decoupled = lr_of, wd, decoupled
        # A scheduled first-moment decay changes a kernel argument every step: it cannot be replayed.
        self.static_blocker = "a scheduled Adam b1 cannot be recorded once" if callable(b1) else None
        self._layouts: dict = {}  # see _layout

    def _kernel(self):
        kernel_adam, kernel_adamw = _fusion_kernels()
        return kernel_adamw if self.decoupled else kernel_adam

    def _layout(self, params: dict, keys: list, adam_state):
        """The parameters and moments of ``keys`` in the kernel's orientation and each one's permutation
        (None where it is contiguous already): ``(p, mu, nu, nu_max, orders)``, or None where the kernel does
        not take them. Worked out once for the same tensors and remembered (raises KeyError for a name with
        no moments)."""
        groups = [(params[k], adam_state.mu[k], adam_state.nu[k]) + ((adam_state.nu_max[k],) if self.amsgrad else ())
                  for k in keys]
        # the tensors are remembered with their layout, so their ids cannot be reused while it is; the data
        # pointers change when a tensor is given other memory (``p.data = ...``)
        signature = tuple((id(t), t.data_ptr()) for group in groups for t in group)
        found = self._layouts.get(signature)
        if found is None:
            found = (groups, self._work_out_layout(groups))
            if len(self._layouts) >= 4:  # a model's full set, and the rarer sets of update_and_apply
                self._layouts.clear()
            self._layouts[signature] = found
        return found[1]

    def _work_out_layout(self, groups: list):
        first = groups[0][0]
        if first.device.type not in ("cpu", "cuda") or first.dtype not in (torch.float32, torch.float64):
            return None
        if any(t.device != first.device or t.dtype != first.dtype for group in groups for t in group):
            return None
        # The kernel is several times slower on strided tensors (the Dense weights are stored transposed):
        # hand it each parameter in the order its memory runs, its moments (and gradient) the same way.
        orders, views = [], []
        for group in groups:
            order = None
            if not group[0].is_contiguous():
                order = memory_order(group[0])
                if order is None:
                    return None
                group = tuple(t.permute(order) for t in group)
            if not all(t.is_contiguous() for t in group):
                return None
            orders.append(order)
            views.append(group)
        p, mu, nu = ([group[i] for group in views] for i in range(3))
        nu_max = [group[3] for group in views] if self.amsgrad else []
        return p, mu, nu, nu_max, orders

    def _layout_of(self, params: dict, keys: list, state: tuple):
        """:meth:`_layout` for the parameters ``keys`` of ``state``, or None where the fused step does not run."""
        if not _ENABLED or not keys or self._kernel() is None or len(state) != self.n_parts:
            return None
        try:
            return self._layout(params, keys, state[self.i_adam])
        except KeyError:
            return None  # let update() report the mismatch in its own words

    def _lists(self, params: dict, grads: dict, state: tuple):
        """Parameter, gradient and moment lists in the kernel's orientation (see the module doc), or None."""
        keys = list(grads)
        layout = self._layout_of(params, keys, state) if params.keys() == grads.keys() else None
        if layout is None:
            return None
        return self.with_grads(layout, range(len(keys)), [grads[k] for k in keys])

    @staticmethod
    def with_grads(layout: tuple, picks, grads: list):
        """The kernel's lists for the entries ``picks`` of a layout and their gradients ``grads`` (in that
        order), each gradient seen in its parameter's orientation; None where one is on another device, of
        another dtype or of another shape than its parameter (the kernels read it by pointer)."""
        p, mu, nu, nu_max, orders = layout
        device, dtype = p[0].device, p[0].dtype
        g = []
        for i, t in zip(picks, grads):
            if t.device != device or t.dtype != dtype or t.dim() != p[i].dim():
                return None
            if orders[i] is not None:
                t = t.permute(orders[i])
            if t.shape != p[i].shape:
                return None
            g.append(t if t.is_contiguous() else t.contiguous())  # read only
        if len(g) == len(p):
            return p, g, mu, nu, nu_max
        return ([p[i] for i in picks], g, [mu[i] for i in picks], [nu[i] for i in picks],
                [nu_max[i] for i in picks] if nu_max else nu_max)

    def _run(self, lists, lr, beta1, count) -> None:
        """One kernel call; ``count`` is the 1-based step, or a device scalar holding it (a recorded step)."""
        p, g, mu, nu, nu_max = lists
        if not isinstance(count, torch.Tensor):
            # the kernel reads each parameter's step from a float32 tensor (as torch keeps them), only reads it
            count = torch.full((), float(count), dtype=torch.float32, device=p[0].device)
        self._kernel()(p, g, mu, nu, nu_max, [count] * len(p), lr=lr, beta1=beta1, beta2=self.b2,
                       weight_decay=self.wd, eps=self.eps, amsgrad=self.amsgrad, maximize=False)

    def next_beta1(self, state: tuple) -> float:
        """The first-moment decay of the coming update (a scheduled one is read at the current count)."""
        return float(self.b1(state[self.i_adam].count)) if callable(self.b1) else float(self.b1)

    def next_lr_and_count(self, state: tuple) -> tuple[float, int]:
        """The learning rate and the (1-based) step count of the coming update."""
        return self.lr_of(state[self.i_lr]), state[self.i_adam].count + 1

    def advance(self, state: tuple) -> tuple:
        """The state after one update: the counters move on; the moment tensors were updated in place."""
        adam_state, lr_state = state[self.i_adam], state[self.i_lr]
        new = list(state)
        new[self.i_adam] = type(adam_state)(adam_state.count + 1, adam_state.mu, adam_state.nu, adam_state.nu_max)
        new[self.i_lr] = type(lr_state)(lr_state.count + 1, lr_state.schedule_state)
        return tuple(new)

    def __call__(self, params: dict, grads: dict, state: tuple):
        lists = self._lists(params, grads, state)
        if lists is None:
            return None
        lr, count = self.next_lr_and_count(state)
        self._run(lists, lr, self.next_beta1(state), count)
        return self.advance(state)

    def inline(self, params: dict, state: tuple) -> "InlineAdam | None":
        """The coming step as an :class:`InlineAdam` for a backward to share, or None where the fused step
        would not run (the kernel or the state does not fit; then use ``update_and_apply``)."""
        keys = list(params)
        layout = self._layout_of(params, keys, state)  # the gradients will come in the same layout
        if layout is None or layout[0][0].device.type != "cpu":
            return None
        return InlineAdam(self, state, keys, layout, [params[k] for k in keys])

    def apply_static(self, params: dict, grads: dict, state: tuple, lr: torch.Tensor, count: torch.Tensor) -> bool:
        """The update with the learning rate and step count read from device scalars ``lr`` and ``count``
        (filled by the caller), so that a recording of it stays right at every replay; the counters in the
        Python state are left to :meth:`advance`. Returns False (nothing done) where the kernel does not apply."""
        lists = self._lists(params, grads, state)
        if lists is None:
            return False
        self._run(lists, lr, self.b1, count)
        return True


class InlineAdam:
    """One coming Adam/AdamW step, offered to the backward before it runs, so that a layer whose backward can
    also update its weight (Dense with the native kernels: ``cd_dense_bwd_adam``) does it there, while the
    weight's gradient is still in the cache, and never writes that gradient out.

    A layer calls :meth:`take` for the parameter it will update (and then must update it); :meth:`finish`,
    after the backward, steps every other parameter (one ``cd_adam`` call per tensor when they are few,
    ``SMALL_REST``; else the ordinary fused step) and returns the state, the same state (counts, moments)
    :meth:`FusedAdam.__call__` leaves. A step that goes this way and one that goes through ``update_and_apply``
    (a gradient callback or hook is registered, so the gradients are wanted) compute the same formula in
    different kernels: their weights agree to float rounding, not bit for bit.

    Attributes:
        hyper: the step's numbers as the native kernel reads them: (lr, beta1, beta2, eps, weight_decay, mode
            (0: none, 1: L2 added to the gradient, 2: decoupled), 1 - beta1^t, sqrt(1 - beta2^t)), each
            computed as torch's fused kernel computes it.
        taken: the names of the parameters a layer has updated.
    """

    def __init__(self, fused: FusedAdam, state: tuple, keys: list, layout: tuple, params: list):
        self.fused, self.state = fused, state
        # every parameter's entry in the kernel's layout, as inline() found it: finish() picks the rest from it
        self._keys, self._layout, self._params = keys, layout, params
        lr, count = fused.next_lr_and_count(state)
        self.beta1 = fused.next_beta1(state)
        self.lr, self.count = float(lr), count
        mode = 0 if not fused.wd else (2 if fused.decoupled else 1)
        self.hyper = (self.lr, self.beta1, float(fused.b2), float(fused.eps), float(fused.wd), float(mode),
                      1.0 - self.beta1 ** count, math.sqrt(1.0 - float(fused.b2) ** count))
        self.taken: set[str] = set()
        self._hyper_array = None

    def hyper_array(self):
        """:attr:`hyper` as the C array of doubles the native kernels read (made once per step)."""
        if self._hyper_array is None:
            self._hyper_array = native.doubles(self.hyper)
        return self._hyper_array

    def take(self, name: str, param: torch.Tensor):
        """The moments of parameter ``name`` for a layer that will apply this step to it in its backward:
        (mu, nu, nu_max or None), each laid out as ``param``; None (the layer runs its plain backward) when
        this step does not cover it or its moments are laid out otherwise. A taken parameter is left out
        of :meth:`finish`."""
        adam_state = self.state[self.fused.i_adam]
        mu, nu = adam_state.mu.get(name), adam_state.nu.get(name)
        nu_max = adam_state.nu_max.get(name) if self.fused.amsgrad else None
        if name in self.taken or mu is None or nu is None or (self.fused.amsgrad and nu_max is None):
            return None
        if any(t.stride() != param.stride() or t.shape != param.shape for t in (mu, nu, *(() if nu_max is None else (nu_max,)))):
            return None
        self.taken.add(name)
        return mu, nu, nu_max

    def finish(self, grads: dict) -> tuple:
        """Run the step on every parameter of :meth:`FusedAdam.inline` that was not taken (``grads`` holds
        exactly those) and return the new state."""
        if self.taken & grads.keys():
            raise RuntimeError(f"{', '.join(sorted(self.taken & grads.keys()))} was updated in the backward already")
        picks = [i for i, k in enumerate(self._keys) if k in grads]
        if len(picks) != len(grads) or len(picks) + len(self.taken) != len(self._keys):
            missing = [k for k in self._keys if k not in grads and k not in self.taken]
            unknown = [k for k in grads if k not in self._keys]
            raise RuntimeError("; ".join(
                ([f"the fused Adam step has no gradient for {', '.join(missing)}"] if missing else [])
                + ([f"{', '.join(unknown)} is not among the step's parameters"] if unknown else [])))
        if picks:
            lists = self.fused.with_grads(self._layout, picks, [grads[self._keys[i]] for i in picks])
            if lists is None:  # inline() checked every parameter; only a gradient unlike its parameter lands here
                raise ValueError(self._mismatch(grads))
            if not self._small_steps(lists):
                self.fused._run(lists, self.lr, self.beta1, self.count)
        return self.fused.advance(self.state)

    def _mismatch(self, grads: dict) -> str:
        """The message for gradients whose shape, dtype or device differ from their parameters'."""
        return _mismatch_message([(k, grads[k], p) for k, p in zip(self._keys, self._params) if k in grads])

    # Up to this many elements in all, the rest of the step is one native call per parameter on one thread:
    # for the tutorial's CNN (1,738 elements besides the Dense weight) 0.09 ms inside a step with torch's
    # fused kernel, whose per-tensor setup and parallel region cost more than the arithmetic.
    SMALL_REST = 1 << 16

    def _small_steps(self, lists) -> bool:
        """The update of small parameters (contiguous, in the kernel's orientation) by ``cd_adam``, the
        formula the Dense kernel applies; False (nothing done) when there is too much or no kernel."""
        p, g, mu, nu, nu_max = lists
        if sum(t.numel() for t in p) > self.SMALL_REST:
            return False
        fn = native.kernel("cd_adam", p[0])
        if fn is None:
            return False
        hyper = self.hyper_array()
        for i, t in enumerate(p):
            fn(t.data_ptr(), mu[i].data_ptr(), nu[i].data_ptr(), nu_max[i].data_ptr() if nu_max else None,
               g[i].data_ptr(), t.numel(), hyper)
        return True


def inline_step(optimizer: GradientTransformation, params: dict, state) -> InlineAdam | None:
    """The optimizer's coming step as an :class:`InlineAdam` a backward can share, or None (the optimizer
    is not one the fused Adam step computes, or that step would not run here)."""
    fused = fused_step(optimizer)
    if not isinstance(fused, FusedAdam):
        return None
    return fused.inline(params, state)


_FUSED_ATTR = "fused_step_of_chain"


def fused_step(optimizer: GradientTransformation) -> Callable | None:
    """The one-pass step :func:`update_and_apply` takes for ``optimizer``, or None (update + apply).

    A transform that brings its own (``TransformInfo.fused``, e.g. ``freeze``) keeps it; a chain whose
    parts spell Adam or AdamW gets a :class:`FusedAdam` (worked out on the first call and remembered on
    the optimizer object); anything else has none.

    Args:
        optimizer: any GradientTransformation.

    Returns:
        ``fn(params, grads, state) -> new_state or None``, or None.
    """
    info = getattr(optimizer, "info", None)
    if info is None:
        return None
    if info.fused is not None:
        return info.fused
    if info.kind != "chain":
        return None
    found = vars(optimizer).get(_FUSED_ATTR, _FUSED_ATTR)
    if found is _FUSED_ATTR:
        found = adam_fusion(info.children)
        vars(optimizer)[_FUSED_ATTR] = found
    return found


def _mismatch_message(pairs) -> str | None:
    """One message naming every (name, gradient, parameter) of ``pairs`` whose gradient's shape, dtype or
    device is not the parameter's; None when all match."""
    wrong = [f"{k}: gradient {tuple(g.shape)} {g.dtype} on {g.device}, parameter {tuple(p.shape)} {p.dtype} on "
             f"{p.device}" for k, g, p in pairs if (g.shape, g.dtype, g.device) != (p.shape, p.dtype, p.device)]
    if not wrong:
        return None
    return ("a gradient does not match its parameter (" + "; ".join(wrong) + "): pass each parameter's gradient "
            "in its own shape, dtype and device")


def _check_like_params(params: dict, grads: dict) -> None:
    message = _mismatch_message([(k, g, params[k]) for k, g in grads.items() if k in params])
    if message is not None:
        raise ValueError(message)


def update_and_apply(optimizer: GradientTransformation, params: dict, grads: dict, state):
    """``updates, state = optimizer.update(grads, state, params); apply_updates(params, updates)`` in one
    fused pass where the optimizer allows it (see the module doc); returns the new state.

    Args:
        optimizer: any GradientTransformation.
        params: dict name -> Tensor, updated in place.
        grads: dict with the same keys (may be overwritten, as with ``update``).
        state: the optimizer's state.

    Returns:
        The new optimizer state.
    """
    fused = fused_step(optimizer)
    if fused is not None:
        new_state = fused(params, grads, state)
        if new_state is not None:
            return new_state
    _check_like_params(params, grads)
    updates, state = optimizer.update(grads, state, params)
    apply_updates(params, updates)
    return state
