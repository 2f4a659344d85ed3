"""Deferred updates: the update dict that the optimizers return, evaluated only when read.

A chain such as ``scale_by_adam -> scale_by_learning_rate`` would, written naively, spend one pass over
every parameter for each scalar multiplication and one more to add the result to the parameters, where
``torch.optim`` does ``p.addcdiv_(m, denom, value=-lr / bc1)`` in a single pass. To cost no more than
``torch.optim``, the building blocks here hand each other a :class:`LazyUpdates`: a dict whose value for
every key is the expression

    u = sum_k (cn_k / cd_k) * num_k / den_k  +  decay * params

kept unevaluated. Scalar transforms (the learning rate, ``scale``) and decoupled weight decay only change
the coefficients; :func:`convdescent.optim.apply_updates` then adds the whole expression to the parameters
with one ``_foreach_addcdiv_``/``_foreach_add_`` per term, exactly as ``torch.optim`` does.

Reading the dict in any way (``u["w"]``, ``.values()``, ``.items()``, ``dict(u)``, pickling, ...)
evaluates the expression once into fresh tensors, and from then on the object reads as an ordinary dict.
Reading changes nothing downstream: unless the values were modified after being read, ``apply_updates``
still adds the expression term by term, so a run is the same bit for bit whether or not a monitor looked
at its updates. Two reads are refused with a RuntimeError rather than answered wrongly: reading after
``apply_updates`` consumed the updates unevaluated, and reading after the tensors the expression refers to
(the optimizer's moment buffers, say) were changed in place by a later ``update`` call.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import torch
from torch import Tensor


class Term(NamedTuple):
    """One term ``(cn / cd) * num / den`` of a deferred update (``den`` None means no division)."""

    num: list[Tensor]
    den: list[Tensor] | None
    cn: float
    cd: float


class _Pending:
    """Placeholder stored in a LazyUpdates' underlying dict until the values are computed."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<pending update>"


PENDING = _Pending()

_APPLIED_MSG = (
    "these updates were added to the parameters by apply_updates() without being evaluated, so their "
    "values are no longer available; read them (e.g. dict(updates) or updates[name]) before calling "
    "apply_updates() if you need them"
)
_MOVED_MSG = (
    "these updates refer to optimizer buffers that a later update() call has since changed in place; "
    "read them (e.g. dict(updates)) before the next update() call if you need their values"
)


class LazyUpdates(dict):
    """An update dict whose values are computed from a short expression the first time they are read.

    Args:
        keys: parameter names, in the order of the tensor lists below.
        terms: the terms of the update; each list holds one tensor per key.
        decay: coefficient of the parameters in the update (decoupled weight decay).
        params: the parameter tensors, one per key (needed when ``decay`` is not zero).
        owned: True when the first term's ``num`` tensors are scratch buffers (the gradients handed to
            ``update``), False when they belong to optimizer state; transforms may write into owned ones.
    """

    __slots__ = ("_keys", "_terms", "_decay", "_params", "_owned", "_versions", "_status", "_values",
                 "_value_versions")

    def __init__(self, keys: Sequence[str], terms: list[Term], decay: float = 0.0,
                 params: list[Tensor] | None = None, owned: bool = False):
        dict.__init__(self, dict.fromkeys(keys, PENDING))
        self._keys = list(keys)
        self._terms = terms
        self._decay = float(decay)
        self._params = params
        self._owned = owned
        self._status = "pending"
        self._versions = self._snapshot()
        self._values: list[Tensor] | None = None
        self._value_versions: tuple[int, ...] = ()

    # ----- the expression -------------------------------------------------------------------------
    def _tracked(self) -> Iterable[Tensor]:
        for term in self._terms:
            yield from term.num
            if term.den is not None:
                yield from term.den
        if self._params is not None:
            yield from self._params

    def _snapshot(self) -> tuple[int, ...]:
        return tuple(t._version for t in self._tracked())

    @property
    def pending(self) -> bool:
        """True while the values have not been computed (nor consumed by apply_updates)."""
        return self._status == "pending"

    @property
    def owned(self) -> bool:
        """Whether the first term's tensors are scratch buffers rather than optimizer state."""
        return self._owned

    @property
    def terms(self) -> list[Term]:
        """The terms of the pending expression."""
        return self._terms

    @property
    def decay(self) -> float:
        """The coefficient of the parameters in the pending expression."""
        return self._decay

    @property
    def decay_params(self) -> list[Tensor] | None:
        """The parameter tensors the decay term refers to."""
        return self._params

    def scaled(self, factor: float) -> "LazyUpdates":
        """Multiply the whole pending expression by ``factor`` (no tensor work); returns self."""
        self._require_pending()
        self._terms = [Term(t.num, t.den, t.cn * factor, t.cd) for t in self._terms]
        self._decay = self._decay * factor
        return self

    def plus_decay(self, weight_decay: float, params: list[Tensor]) -> "LazyUpdates":
        """Add ``weight_decay * params`` to the pending expression (no tensor work); returns self."""
        self._require_pending()
        if self._params is not None and any(a is not b for a, b in zip(self._params, params)):
            raise ValueError("a deferred update cannot decay two different sets of parameters")
        self._params = params
        self._decay = self._decay + weight_decay
        self._versions = self._snapshot()
        return self

    def single_term(self) -> Term | None:
        """The only term when the expression is one term without decay, else None."""
        if len(self._terms) == 1 and self._decay == 0.0:
            return self._terms[0]
        return None

    def _require_pending(self) -> None:
        if self._status != "pending":
            raise RuntimeError("the update expression was already evaluated or applied")

    def _check_unmoved(self) -> None:
        if self._snapshot() != self._versions:
            raise RuntimeError(_MOVED_MSG)

    def _evaluate(self) -> list[Tensor]:
        # Always into fresh tensors: the terms stay valid, so apply_updates can still use them.
        first, rest = self._terms[0], self._terms[1:]
        c = first.cn / first.cd
        if first.den is not None:
            out = torch._foreach_div(first.num, first.den)
            if c != 1.0:
                torch._foreach_mul_(out, c)
        else:
            out = torch._foreach_mul(first.num, c)
        for term in rest:
            c = term.cn / term.cd
            if term.den is not None:
                torch._foreach_addcdiv_(out, term.num, term.den, value=c)
            else:
                torch._foreach_add_(out, term.num, alpha=c)
        if self._decay != 0.0:
            torch._foreach_add_(out, self._params, alpha=self._decay)
        return out

    def force(self) -> None:
        """Compute the values now (a no-op once computed); afterwards this reads as an ordinary dict."""
        if self._status == "forced":
            return
        if self._status == "applied":
            raise RuntimeError(_APPLIED_MSG)
        self._check_unmoved()
        values = self._evaluate()
        dict.update(self, zip(self._keys, values))
        self._status = "forced"
        self._values = values
        self._value_versions = tuple(v._version for v in values)

    def _values_untouched(self) -> bool:
        current = list(dict.values(self))
        return (len(current) == len(self._values)
                and all(a is b for a, b in zip(current, self._values))
                and tuple(v._version for v in current) == self._value_versions)

    def _add_terms(self, params: list[Tensor]) -> None:
        if self._decay != 0.0:
            torch._foreach_mul_(params, 1.0 + self._decay)
        for term in self._terms:
            c = term.cn / term.cd
            if term.den is not None:
                torch._foreach_addcdiv_(params, term.num, term.den, value=c)
            else:
                torch._foreach_add_(params, term.num, alpha=c)

    def apply_to(self, params: list[Tensor]) -> None:
        """Add the updates to ``params`` in place.

        The expression is added term by term (one foreach op per term, as torch.optim does) whenever it is
        still exact to do so, i.e. whether or not the values were read, unless they were modified since;
        otherwise the evaluated values are added. Pending updates are consumed by this.

        Args:
            params: the parameter tensors, in this dict's key order.
        """
        if self._status == "applied":
            raise RuntimeError("these updates were already applied; compute new ones with update()")
        decay_elsewhere = self._decay != 0.0 and (
            self._params is None or any(a is not b for a, b in zip(self._params, params)))
        if self._status == "forced":
            if (self._terms and not decay_elsewhere and self._values_untouched()
                    and self._snapshot() == self._versions):
                self._add_terms(params)
            else:
                torch._foreach_add_(params, list(dict.values(self)))
            # A second application (as with a plain dict) adds the evaluated values again.
            self._terms = []
            return
        self._check_unmoved()
        if decay_elsewhere:
            # The decay refers to other tensors than the ones being updated: evaluate instead.
            self.force()
            self._terms = []
            torch._foreach_add_(params, list(dict.values(self)))
            return
        self._add_terms(params)
        self._status = "applied"
        self._terms = []
        self._params = None
        self._versions = ()

    # ----- dict behaviour: every read evaluates first ---------------------------------------------
    def __getitem__(self, key):
        self.force()
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        self.force()
        return dict.get(self, key, default)

    def values(self):
        self.force()
        return dict.values(self)

    def items(self):
        self.force()
        return dict.items(self)

    def __iter__(self):
        # Overriding __iter__ makes CPython's dict(x) / {**x} go through __getitem__ instead of
        # copying the placeholders straight out of the underlying table.
        return dict.__iter__(self)

    def copy(self):
        self.force()
        return dict(dict.items(self))

    def __eq__(self, other):
        self.force()
        return dict.__eq__(self, other)

    def __ne__(self, other):
        self.force()
        return dict.__ne__(self, other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        if self._status == "pending":
            return f"LazyUpdates(pending, keys={self._keys!r})"
        if self._status == "applied":
            return f"LazyUpdates(applied, keys={self._keys!r})"
        return dict.__repr__(self)

    def __reduce_ex__(self, protocol):
        self.force()
        return (dict, (dict(dict.items(self)),))

    def __setitem__(self, key, value):
        self.force()
        dict.__setitem__(self, key, value)

    def __delitem__(self, key):
        self.force()
        dict.__delitem__(self, key)

    def pop(self, key, *default):
        self.force()
        return dict.pop(self, key, *default)

    def popitem(self):
        self.force()
        return dict.popitem(self)

    def setdefault(self, key, default=None):
        self.force()
        return dict.setdefault(self, key, default)

    def update(self, *args, **kwargs):
        self.force()
        dict.update(self, *args, **kwargs)

    def clear(self):
        self.force()
        dict.clear(self)

    def __or__(self, other):
        self.force()
        return dict(dict.items(self)) | other

    def __ror__(self, other):
        self.force()
        return other | dict(dict.items(self))

    def __ior__(self, other):
        self.force()
        dict.update(self, other)
        return self


def as_lazy(updates: dict, owned: bool = True) -> LazyUpdates:
    """View ``updates`` as a pending expression (a LazyUpdates that is still pending is returned as is).

    Args:
        updates: an update dict (plain, or a LazyUpdates in any status).
        owned: whether the plain dict's tensors may be overwritten (true for gradients given to update).

    Returns:
        A pending LazyUpdates equal to ``updates``.
    """
    if isinstance(updates, LazyUpdates) and updates.pending:
        return updates
    keys = list(updates)
    return LazyUpdates(keys, [Term([updates[k] for k in keys], None, 1.0, 1.0)], owned=owned)


def tensors(updates: dict) -> tuple[list[str], list[Tensor]]:
    """Keys and evaluated tensors of an update dict (evaluating a pending LazyUpdates).

    Args:
        updates: a dict of tensors, shapes matching the parameters.

    Returns:
        ``(keys, values)`` in the dict's order.
    """
    keys = list(updates)
    if isinstance(updates, LazyUpdates):
        updates.force()
        return keys, list(dict.values(updates))
    return keys, [updates[k] for k in keys]
