"""The gradient-transformation contract: transforms, chain, apply_updates, state saving, describe.

A transform is a pair of pure-looking functions in the style of Optax:
``init(params) -> state`` and ``update(grads, state, params=None) -> (updates, new_state)``, where
``params``, ``grads`` and ``updates`` are dicts ``name -> Tensor`` with the same keys and shapes. For speed
``update`` may overwrite the tensors of ``grads`` and mutate its state tensors in place; it never reads a
value back to the host, and step counters are plain Python ints.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import Tensor

from .updates import LazyUpdates

Params = dict[str, Tensor]
InitFn = Callable[[Params], Any]
UpdateFn = Callable[..., tuple[dict, Any]]


class TransformInfo(NamedTuple):
    """What ``describe`` and ``current_lr`` know about a transform built by this package.

    Fields:
        name: the builder's name, e.g. ``"scale_by_adam"``.
        args: positional settings shown by describe.
        kwargs: keyword settings shown by describe (in order).
        kind: ``"leaf"``, ``"chain"``, ``"record"`` or ``"lr"`` (a learning-rate scaler).
        children: the transforms a chain or a recorder wraps.
        lr_of: for ``kind == "lr"``, a function ``state -> float`` giving the next step's learning rate.
        schedule: for ``kind == "lr"``, the schedule (or number) it was built with.
        fused: a transform's own one-pass step, ``fn(params, grads, state) -> new_state or None`` doing
            update and apply together (``freeze`` has one), or None. Chains have none here:
            :func:`convdescent.optim.fused.fused_step` recognises the ones a fused kernel computes.
    """

    name: str
    args: tuple = ()
    kwargs: dict | None = None
    kind: str = "leaf"
    children: tuple = ()
    lr_of: Callable[[Any], float] | None = None
    schedule: Any = None
    fused: Callable | None = None


class _TransformPair(NamedTuple):
    init: InitFn
    update: UpdateFn


class GradientTransformation(_TransformPair):
    """A gradient transformation ``(init, update)``; a NamedTuple like Optax's.

    ``init(params) -> state`` builds the state for a dict of parameters ``name -> (shape...)``;
    ``update(grads, state, params=None) -> (updates, new_state)`` maps gradients to updates with the same
    keys and shapes. Transforms built by this package also carry a :class:`TransformInfo` in ``.info``
    (used by :func:`describe` and :func:`current_lr`); ``GradientTransformation(init, update)`` works for
    user-written ones.
    """

    def __new__(cls, init: InitFn, update: UpdateFn, info: TransformInfo | None = None):
        if not callable(init) or not callable(update):
            raise ValueError(f"GradientTransformation needs two callables (init, update), got {init!r}, {update!r}")
        self = super().__new__(cls, init, update)
        self.info = info
        return self

    def __getnewargs__(self):
        return (self.init, self.update, getattr(self, "info", None))

    def __repr__(self) -> str:
        return f"GradientTransformation({describe(self)})"


class EmptyState(NamedTuple):
    """State of a transform that keeps nothing."""


def _info(tx: GradientTransformation) -> TransformInfo | None:
    return getattr(tx, "info", None)


def _check_transform(tx: Any, where: str) -> GradientTransformation:
    if isinstance(tx, GradientTransformation):
        return tx
    if isinstance(tx, tuple) and len(tx) == 2 and callable(tx[0]) and callable(tx[1]):
        return GradientTransformation(tx[0], tx[1])
    raise ValueError(f"{where} must be a GradientTransformation (init, update), got {tx!r}")


def identity() -> GradientTransformation:
    """A transform that returns the gradients unchanged.

    Returns:
        GradientTransformation with an empty state.
    """

    def init(params: Params) -> EmptyState:
        return EmptyState()

    def update(grads, state, params=None):
        return grads, state

    return GradientTransformation(init, update, TransformInfo("identity"))


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Compose transforms: the updates of each feed the next, left to right.

    Nested chains are flattened, so ``chain(chain(a, b), c)`` is ``chain(a, b, c)``.

    Args:
        *transforms: GradientTransformations (or ``(init, update)`` pairs).

    Returns:
        GradientTransformation whose state is the tuple of the parts' states.
    """
    parts: list[GradientTransformation] = []
    for i, tx in enumerate(transforms):
        tx = _check_transform(tx, f"chain argument {i}")
        info = _info(tx)
        if info is not None and info.kind == "chain":
            parts.extend(info.children)
        else:
            parts.append(tx)
    parts_t = tuple(parts)
    inits = tuple(p.init for p in parts_t)
    updates_fns = tuple(p.update for p in parts_t)

    def init(params: Params) -> tuple:
        return tuple(fn(params) for fn in inits)

    def update(grads, state, params=None):
        if len(state) != len(updates_fns):
            raise ValueError(
                f"chain state has {len(state)} parts but the chain has {len(updates_fns)} transforms; "
                "build the state with this chain's init(params)")
        if not grads:
            # Nothing to optimise (a model without parameters): foreach ops refuse empty lists.
            return {}, state
        new_state = []
        for fn, s in zip(updates_fns, state):
            grads, s = fn(grads, s, params)
            new_state.append(s)
        return grads, tuple(new_state)

    return GradientTransformation(init, update, TransformInfo("chain", kind="chain", children=parts_t))


def apply_updates(params: Params, updates: dict) -> None:
    """Add the updates to the parameters in place (``p += u``); returns nothing.

    A :class:`~convdescent.optim.updates.LazyUpdates` is added term by term (one foreach op per term, as
    torch.optim does), whether or not it was read; if it was not read before, it cannot be read afterwards.

    Args:
        params: dict ``name -> Tensor`` of parameters, updated in place.
        updates: dict with the same keys and shapes.
    """
    if params.keys() != updates.keys():
        missing = sorted(set(params) - set(updates))
        extra = sorted(set(updates) - set(params))
        raise ValueError(
            f"updates must have the same keys as params; missing {missing}, unexpected {extra}")
    keys = list(updates)
    if not keys:
        return
    plist = [params[k] for k in keys]
    if isinstance(updates, LazyUpdates):
        updates.apply_to(plist)
        return
    torch._foreach_add_(plist, [updates[k] for k in keys])


# ----- describe ---------------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return "(" + ", ".join(_fmt(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def describe(tx: GradientTransformation) -> str:
    """A readable one-line description of a transform, e.g.
    ``chain(clip_by_global_norm(max_norm=1.0), scale_by_adam(b1=0.9, b2=0.999, eps=1e-08), scale_by_learning_rate(0.001))``.

    Args:
        tx: the transform.

    Returns:
        The description string.
    """
    info = _info(tx)
    if info is None:
        fn = tx.update
        return f"<{getattr(fn, '__qualname__', type(fn).__name__)}>"
    if info.kind == "chain":
        return "chain(" + ", ".join(describe(c) for c in info.children) + ")"
    if info.kind == "record":
        return f"{info.name}(" + ", ".join(describe(c) for c in info.children) + ")"
    parts = [_fmt(a) for a in info.args]
    parts += [f"{k}={_fmt(v)}" for k, v in (info.kwargs or {}).items()]
    return f"{info.name}(" + ", ".join(parts) + ")"


def _walk(tx: GradientTransformation, state: Any) -> Iterator[tuple[TransformInfo, Any]]:
    """Yield (info, state) for every transform inside ``tx``, depth first."""
    info = _info(tx)
    if info is None:
        return
    if info.kind == "chain":
        for child, s in zip(info.children, state):
            yield from _walk(child, s)
    elif info.kind == "record":
        yield info, state
        yield from _walk(info.children[0], state.inner)
    else:
        yield info, state


def walk_infos(tx: GradientTransformation) -> Iterator[TransformInfo]:
    """Yield the :class:`TransformInfo` of ``tx`` and of every transform inside it, depth first (transforms
    without an info, written by users, and what they wrap are skipped)."""
    info = _info(tx)
    if info is None:
        return
    yield info
    for child in info.children:
        yield from walk_infos(child)


def current_lr(tx: GradientTransformation, state: Any) -> float:
    """The learning rate the next update will use (the schedule at the current step).

    Args:
        tx: an optimizer built by this package (containing ``scale_by_learning_rate``).
        state: its current state.

    Returns:
        The learning rate as a Python float (the product if the chain scales by several).
    """
    lrs = [info.lr_of(s) for info, s in _walk(tx, state) if info.kind == "lr"]
    if not lrs:
        raise ValueError(
            f"current_lr: the transform {describe(tx)} has no scale_by_learning_rate; "
            "build optimizers with make_optimizer() or a named builder such as adam()")
    lr = 1.0
    for v in lrs:
        lr *= v
    return lr


def find_plateau(tx: GradientTransformation):
    """The ReduceOnPlateau schedule driving ``tx``'s learning rate, or None.

    The trainer calls ``.step(metric)`` on it once per epoch.

    Args:
        tx: an optimizer built by this package.

    Returns:
        The ReduceOnPlateau object, or None when the learning rate does not depend on a metric.
    """
    from .schedules import stateful_parts

    for info in walk_infos(tx):
        if info.kind == "lr":
            found = stateful_parts(info.schedule)
            if found:
                return found[0]
    return None


# ----- state saving -----------------------------------------------------------------------------------

def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def state_dict(state: Any) -> Any:
    """Turn an optimizer state into nested dicts of tensors and numbers (tensors cloned).

    NamedTuples become dicts by field name, tuples become dicts keyed ``"0", "1", ...``, objects with a
    ``state_dict()`` method (a :class:`ReduceOnPlateau`) contribute that dict.

    Args:
        state: the state returned by ``init``/``update``.

    Returns:
        A structure ``torch.save`` can write; :func:`load_state_dict` reverses it.
    """
    if isinstance(state, Tensor):
        return state.detach().clone()
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    if _is_namedtuple(state):
        return {f: state_dict(getattr(state, f)) for f in state._fields}
    if isinstance(state, (tuple, list)):
        return {str(i): state_dict(v) for i, v in enumerate(state)}
    if isinstance(state, dict):
        return {k: state_dict(v) for k, v in state.items()}
    if hasattr(state, "state_dict") and callable(state.state_dict):
        return state.state_dict()
    raise TypeError(f"state_dict: cannot save a {type(state).__name__} found in the optimizer state")


def load_state_dict(template: Any, saved: Any, _path: str = "state") -> Any:
    """Rebuild an optimizer state from :func:`state_dict` output, using a fresh state as the template.

    Args:
        template: a state of the same optimizer, e.g. ``opt.init(params)`` (gives the structure, tensor
            devices and dtypes; stateful objects in it are restored in place).
        saved: the nested dict produced by :func:`state_dict` (possibly after ``torch.save``/``torch.load``).

    Returns:
        The restored state; continuing from it reproduces the uninterrupted run bit for bit.
    """
    if isinstance(template, Tensor):
        if not isinstance(saved, Tensor):
            raise ValueError(f"load_state_dict: {_path} must be a tensor, got {type(saved).__name__}")
        if saved.shape != template.shape:
            raise ValueError(
                f"load_state_dict: {_path} has shape {tuple(saved.shape)} but this optimizer expects "
                f"{tuple(template.shape)}; was the checkpoint made for another model?")
        return saved.detach().to(device=template.device, dtype=template.dtype).clone()
    if template is None or isinstance(template, str):
        if saved != template:
            raise ValueError(f"load_state_dict: {_path} must be {template!r}, got {saved!r}")
        return saved
    if isinstance(template, bool):
        if not isinstance(saved, bool):
            raise ValueError(f"load_state_dict: {_path} must be a bool, got {saved!r}")
        return saved
    if isinstance(template, int):
        if isinstance(saved, bool) or not isinstance(saved, int):
            raise ValueError(f"load_state_dict: {_path} must be an int, got {saved!r}")
        return saved
    if isinstance(template, float):
        if isinstance(saved, bool) or not isinstance(saved, (int, float)):
            raise ValueError(f"load_state_dict: {_path} must be a number, got {saved!r}")
        return float(saved)
    if _is_namedtuple(template):
        _check_keys(saved, list(template._fields), _path)
        return type(template)(*[load_state_dict(getattr(template, f), saved[f], f"{_path}.{f}")
                                for f in template._fields])
    if isinstance(template, (tuple, list)):
        _check_keys(saved, [str(i) for i in range(len(template))], _path)
        out = [load_state_dict(v, saved[str(i)], f"{_path}.{i}") for i, v in enumerate(template)]
        return type(template)(out)
    if isinstance(template, dict):
        _check_keys(saved, list(template), _path)
        return {k: load_state_dict(v, saved[k], f"{_path}.{k}") for k, v in template.items()}
    if hasattr(template, "load_state_dict") and callable(template.load_state_dict):
        if not isinstance(saved, dict):
            raise ValueError(f"load_state_dict: {_path} must be a dict, got {type(saved).__name__}")
        template.load_state_dict(saved)
        return template
    raise TypeError(f"load_state_dict: cannot restore a {type(template).__name__} at {_path}")


def _check_keys(saved: Any, expected: list[str], path: str) -> None:
    if not isinstance(saved, dict):
        raise ValueError(f"load_state_dict: {path} must be a dict with keys {expected}, got {type(saved).__name__}")
    if set(saved) != set(expected):
        raise ValueError(
            f"load_state_dict: {path} has keys {sorted(saved)} but this optimizer expects {sorted(expected)}; "
            "was the checkpoint made with another optimizer or model?")
