"""Observers of a model's forward and backward: registered functions the execution plan calls, read-only.

    handle = model.register_hook("after_forward", fn, layer="conv1")   # fn(layer_name, layer, output)
    handle = model.register_hook("after_backward", fn)                 # fn(layer_name, layer, grads)
    handle = model.register_hook("before_forward", fn, layer=relu)     # fn(layer_name, layer, input)
    handle.remove()

``after_forward`` fires once the layer's output exists (in a chunked stage, once per chunk with that chunk's
rows); ``after_backward`` fires, in backward order and during the backward pass, as soon as the layer's
parameter gradients are final (after every chunk, or after the fused node that holds the layer), with those
gradients keyed by qualified parameter name. A container (``Residual``) reports only parameters of its own;
its nested layers fire their own events, so hooks on every layer see each parameter exactly once.
Hooks must not change the tensors they are given.
"""

from __future__ import annotations

from typing import Callable

EVENTS = ("before_forward", "after_forward", "after_backward")
_SPLITTING = ("before_forward", "after_forward")  # events that need a value a fused node may never write


class HookHandle:
    """What ``register_hook`` returns; ``remove()`` takes the hook away (again: no effect).

    ``pause()`` makes the hook as if removed, without removing it, until ``resume()``: a hook that is only
    needed now and then (the health check's, every 50 steps) is paused between its steps, and its plan, kept
    by the model, is found again when it resumes instead of being compiled anew."""

    def __init__(self, hooks: "Hooks", key: int):
        self._hooks = hooks
        self.key = key

    def remove(self) -> None:
        self._hooks.remove(self.key)

    def pause(self) -> None:
        self._hooks.set_paused(self.key, True)

    def resume(self) -> None:
        self._hooks.set_paused(self.key, False)

    def __enter__(self) -> "HookHandle":
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False


class Hooks:
    """The hooks of one model, by event and target; ``version`` changes whenever the set changes (a hook is
    added, removed, paused or resumed). A paused hook is kept but counts nowhere: not in ``len``, not in the
    functions a plan calls.

    A target is a qualified layer name, or None for every layer. ``split`` (before_forward and after_forward)
    says whether the hook may make the plan run a layer outside its fused node to produce an input or output
    that node never writes; with ``split=False`` such a layer's hook is not called and the fused node stays.
    """

    def __init__(self):
        self._entries: dict[int, tuple[str, Callable, str | None, bool]] = {}
        self._next = 0
        self.version = 0
        self._paused: set[int] = set()
        self._summary: tuple = (frozenset(), False, 0)  # (signature, observes forward, version they were made at)

    def add(self, event: str, fn: Callable, target: str | None, split: bool = True) -> HookHandle:
        if event not in EVENTS:
            raise ValueError(f"hook event must be one of {', '.join(EVENTS)}, got {event!r}")
        if not callable(fn):
            raise TypeError(f"a hook must be callable, got {type(fn).__name__}")
        key = self._next
        self._next += 1
        self._entries[key] = (event, fn, target, bool(split))
        self.version += 1
        return HookHandle(self, key)

    def remove(self, key: int) -> None:
        if self._entries.pop(key, None) is not None:
            self._paused.discard(key)
            self.version += 1

    def set_paused(self, key: int, paused: bool) -> None:
        if key in self._entries and (key in self._paused) != paused:
            (self._paused.add if paused else self._paused.discard)(key)
            self.version += 1

    def _active(self):
        return (entry for key, entry in self._entries.items() if key not in self._paused)

    def __len__(self) -> int:
        return len(self._entries) - len(self._paused)

    def signature(self) -> frozenset:
        """The keys of the active hooks: what a plan compiled for them depends on (a key is never given to
        another hook, so a plan kept for a signature holds exactly the functions of those hooks)."""
        return self._current()[0]

    def _current(self) -> tuple:
        """(signature, observes_forward) of the active hooks, remade when the set has changed (both are read
        every step)."""
        sig, observes, version = self._summary
        if version != self.version:
            sig = frozenset(self._entries.keys() - self._paused)
            observes = any(ev in _SPLITTING for ev, _, _, _ in self._active())
            self._summary = (sig, observes, self.version)
        return sig, observes

    def registered(self) -> set:
        """The keys of every hook not removed, paused ones included."""
        return set(self._entries)

    def observes_forward(self) -> bool:
        """Whether any before_forward or after_forward hook is active (they are shown activations)."""
        return self._current()[1]

    def functions(self, event: str, name: str) -> list[Callable]:
        """The hooks of ``event`` that apply to the layer ``name``, in the order they were registered."""
        return [fn for ev, fn, target, _ in self._active() if ev == event and (target is None or target == name)]

    def forces_split(self, event: str, name: str) -> bool:
        """Whether a hook of ``event`` needs the layer ``name``'s own input or output written out."""
        return any(ev == event and split and (target is None or target == name)
                   for ev, _, target, split in self._active())

    def describe(self) -> list[str]:
        """One line per hook: event and target."""
        return [f"{ev} on {target if target is not None else 'every layer'}"
                + ("" if split or ev not in _SPLITTING else " (never splits a fused node)")
                for ev, _, target, split in self._active()]
