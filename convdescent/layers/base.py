"""The layer contract shared by every layer of the engine.

A layer holds its parameters in ``params`` (torch layouts and names, e.g. ``weight`` of shape
``(F, C, kh, kw)``), computes ``forward`` while keeping what its backward needs, and in ``backward``
returns dL/dx and writes dL/dparams into ``grads`` under the same keys. The engine runs with autograd
off; every backward is written out by hand and checked by the test suite.
"""

from __future__ import annotations

from typing import Any

import torch

Shape = tuple[int, ...]


class Layer:
    """Base class of all layers.

    Subclasses set ``kind`` (the prefix of the automatic name, e.g. ``"conv"``) and implement
    ``build``, ``forward``, ``backward``, ``get_config`` and ``to_torch``.

    Attributes:
        params: dict of parameter tensors, filled by ``build``.
        grads: dict of gradient tensors with the same keys, written by ``backward``.
        name: unique name inside a model (``conv1``), given by ``Sequential`` when not set.
        needs_input_grad: when False (the first layer of a model), ``backward`` may skip dL/dx
            and return None; this saves the most expensive part of the first conv's backward.
        trainable: when False (a frozen layer, ``Sequential.freeze``), ``backward`` computes only dL/dx and
            leaves dL/dparams alone: ``param_grads()`` then gives zeros that no backward overwrites. Layers
            with statistics of their own (batch norm) also stop updating them and normalize with them.
    """

    kind = "layer"
    # True when the layer treats every example on its own (no batch statistics, no shared randomness):
    # forward on a batch equals forward on its pieces, and parameter gradients add up over the pieces.
    # Sequential runs a leading stack of such layers in cache-sized chunks.
    samplewise = False

    def __init__(self, name: str | None = None):
        self.params: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.name = name
        self.built = False
        self.input_shape: Shape | None = None
        self.output_shape: Shape | None = None
        self.needs_input_grad = True
        self._trainable = True
        self.training = False
        self._cache = None  # what forward keeps for backward; cleared by backward and clear_cache

    # -- construction -------------------------------------------------------------------------
    def build(self, input_shape: Shape, generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Shape:
        """Create parameters for inputs of ``input_shape`` (without the batch axis).

        Returns:
            The output shape without the batch axis.
        """
        self.input_shape = tuple(input_shape)
        self.output_shape = tuple(self.compute_output_shape(self.input_shape))
        self.built = True
        return self.output_shape

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        return input_shape

    # -- computation ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Compute the output of shape ``(N, *output_shape)``, keeping what backward needs."""
        raise TypeError(f"{type(self).__name__} does not define forward")

    def backward(self, dy: torch.Tensor) -> torch.Tensor | None:
        """Given dL/dy, write dL/dparams into ``grads`` and return dL/dx (None if not needed)."""
        raise TypeError(f"{type(self).__name__} does not define backward")

    def backward_and_update(self, dy: torch.Tensor, update, prefix: str) -> torch.Tensor | None:
        """``backward``, given the chance to apply the optimizer's coming step to this layer's own parameters
        in the same pass (``update`` is an ``optim.InlineAdam``; parameter ``key`` is ``prefix + key`` there).
        A parameter the layer updates itself gets no entry in ``grads``. This default takes no part of the
        update and runs ``backward``: the step then updates every parameter after the backward."""
        return self.backward(dy)

    def __call__(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        return self.forward(x, train)

    # -- freezing -------------------------------------------------------------------------------
    @property
    def trainable(self) -> bool:
        """Whether ``backward`` computes this layer's own parameter gradients (see the class attributes)."""
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        self._trainable = bool(value)
        self.grads = {}  # a frozen layer's zeros, or a thawed one's next backward, replace what was there
        if not self._trainable:
            self.param_grads()

    def param_grads(self) -> dict[str, torch.Tensor]:
        """This layer's own parameter gradients by key: what the last backward wrote, or for a frozen layer
        zeros of each parameter's shape, made once and never written by a backward."""
        if not self._trainable:
            for key, p in self.params.items():
                g = self.grads.get(key)
                if g is None or g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                    self.grads[key] = torch.zeros_like(p)
        return self.grads

    def has_trainable(self) -> bool:
        """Whether this layer or a nested one has parameters whose gradients backward computes."""
        return (bool(self.params) and self._trainable) or any(sub.has_trainable() for sub in self.sublayers())

    # -- description ----------------------------------------------------------------------------
    def clear_cache(self) -> None:
        """Drop what the last forward kept (after evaluation, when no backward follows)."""
        self._cache = None
        for sub in self.sublayers():
            sub.clear_cache()

    def take_cache(self):
        """What the last forward kept, handed over and cleared (a chunked plan keeps one per chunk)."""
        cache, self._cache = self._cache, None
        return cache

    def put_cache(self, cache) -> None:
        """Give back a cache from ``take_cache``, so the next ``backward`` reads it."""
        self._cache = cache

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Layer":
        """Rebuild a layer from ``get_config()`` output."""
        return cls(**config)

    def get_config(self) -> dict[str, Any]:
        """Arguments that rebuild this layer with ``type(layer)(**config)``."""
        return {"name": self.name}

    def to_torch(self) -> torch.nn.Module:
        """An equivalent standard ``torch.nn`` module holding copies of this layer's weights."""
        raise TypeError(f"{type(self).__name__} has no torch.nn equivalent")

    def sublayers(self) -> list["Layer"]:
        """Layers nested inside this one (containers override this)."""
        return []

    def named_params(self, prefix: str = ""):
        """Yield (qualified name, tensor) for this layer's parameters and those of nested layers."""
        for key, value in self.params.items():
            yield prefix + key, value
        for sub in self.sublayers():
            yield from sub.named_params(f"{prefix}{sub.name}.")

    def named_grads(self, prefix: str = "", skip=frozenset()):
        """Yield (qualified name, gradient) in the same order as ``named_params``, leaving out the names in
        ``skip``."""
        grads = self.param_grads()
        for key in self.params:
            if prefix + key not in skip:
                yield prefix + key, grads[key]
        for sub in self.sublayers():
            yield from sub.named_grads(f"{prefix}{sub.name}.", skip)

    def named_buffers(self, prefix: str = ""):
        """Yield (qualified name, tensor) for non-trainable state, nested layers included."""
        for key, value in self.buffers().items():
            yield prefix + key, value
        for sub in self.sublayers():
            yield from sub.named_buffers(f"{prefix}{sub.name}.")

    def buffers(self) -> dict[str, torch.Tensor]:
        """Non-trainable state saved with the model (e.g. batch-norm running statistics)."""
        return {}

    def to(self, device=None, dtype=None) -> "Layer":
        """Move parameters and buffers to ``device`` / ``dtype`` in place of the old tensors."""
        for key, value in list(self.params.items()):
            self.params[key] = value.to(device=device, dtype=dtype)
        self.grads = {}
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "name")
        return f"{type(self).__name__}({args})"


def assign_names(layers: list[Layer], where: str = "") -> None:
    """Give unnamed layers names like ``conv1``, ``dense2`` (per kind, skipping names already taken) and
    refuse duplicates; ``where`` (e.g. " inside a Residual block") says whose layers they are in the error."""
    counts: dict[str, int] = {}
    taken = {layer.name for layer in layers if layer.name}
    for layer in layers:
        if layer.name:
            continue
        while True:
            counts[layer.kind] = counts.get(layer.kind, 0) + 1
            candidate = f"{layer.kind}{counts[layer.kind]}"
            if candidate not in taken:
                break
        layer.name = candidate
        taken.add(candidate)
    names = [layer.name for layer in layers]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"layer names{where} must be unique, got duplicates {dupes}")


def pair(value, argname: str, allow_zero: bool = False) -> tuple[int, int]:
    """Normalize an int or a pair of ints into a pair, with an error naming ``argname``."""
    given = value  # errors quote what the caller passed, e.g. "got -3", not the expanded pair
    if isinstance(value, bool):
        raise ValueError(f"{argname} must be an int or a pair of ints, got {given!r}")
    if isinstance(value, int):
        value = (value, value)
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(f"{argname} must be an int or a pair of ints, got {given!r}") from None
    for v in (a, b):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{argname} must be an int or a pair of ints, got {given!r}")
        if v < 0 or (v == 0 and not allow_zero):
            bound = "non-negative" if allow_zero else "positive"
            raise ValueError(f"{argname} must be {bound}, got {given!r}")
    return int(a), int(b)


def check_rank(x: torch.Tensor, rank: int, layer: Layer) -> None:
    """Raise a clear error when ``x`` does not have ``rank`` dimensions (batch included)."""
    if x.dim() != rank:
        expect = {4: "(N, C, H, W)", 2: "(N, features)"}.get(rank, f"{rank} dimensions")
        raise ValueError(f"{type(layer).__name__} '{layer.name}' expects input of shape {expect}, "
                         f"got shape {tuple(x.shape)}")
