"""The execution plan: how a model's layers actually run, compiled once and shown by ``model.plan()``.

A ``Sequential`` compiles its layers into a list of nodes, and compiles again when its layers, its hooks or
a setting (fusion, chunk size, the native kernels) change:

- ``LayerNode``: one layer, its own forward and backward.
- ``ConvPool``: a Conv2D and the MaxPool2D after it, with or without a ReLU between them, as one native pass
  that never writes the conv's feature map; the node keeps the pass's cache (padded input, each window's
  winner) itself. A first layer also gets the fused backward, which sends each window's gradient through its
  winner's patch straight into dW and db.
- ``PoolReLU``: a ReLU and the max-pool after it, run pool first. Max-pooling and ReLU commute exactly
  (max is monotone; where a window's maximum is positive both route its gradient to the same element,
  where it is not both give zero), and the ReLU then works on a quarter of the elements (2x2 pools).
- ``ResidualNode``: a ``Residual`` block whose branch and projection run as plans of their own.

The leading nodes whose layers all treat every example on its own (``Layer.samplewise``) form a chunked
stage when one of them is a conv that writes its whole feature map: batches larger than the chunk size run
through them in chunks whose activations stay in the CPU caches from one layer to the next, and the
parameter gradients are summed over the chunks. With every conv fused there is nothing to gain and no stage.

Hooks (``convdescent.hooks``) are part of the plan: each node knows which hooks to call after its forward and
backward. A fused node can give a hook only its own output (the value of its last layer in written order);
a forward hook on another of its layers splits it, and the plan says so (a node's input is its
first layer's: before_forward hooks there keep it whole).
"""

from __future__ import annotations

from typing import Callable

import torch

from . import native, workspace
from .hooks import Hooks
from .layers.activations import ReLU
from .layers.base import Layer
from .layers.conv import Conv2D
from .layers.pool import MaxPool2D, backward_by_code
from .layers.residual import Residual


def layer_grads(name: str, layer: Layer) -> dict[str, torch.Tensor]:
    """The layer's own parameter gradients keyed by qualified name (nested layers' are theirs to report);
    a frozen layer's are its zeros."""
    grads = layer.param_grads()
    return {f"{name}.{key}": grads[key] for key in layer.params if key in grads}


class Node:
    """One step of the plan: ``members`` (qualified name, layer) in written order, run as a unit.

    Subclasses implement ``forward``, ``backward``, ``take_cache``, ``put_cache`` and ``clear_cache``;
    ``output_of`` names the member whose forward output the node's output is.
    """

    how = "layer"

    def __init__(self, members: list[tuple[str, Layer]]):
        self.members = members
        self.label = "+".join(name for name, _ in members)
        self.input_of = members[0][0]
        self.output_of = members[-1][0]
        self.before_hooks: list[tuple[str, Layer, Callable]] = []
        self.forward_hooks: list[tuple[str, Layer, Callable]] = []
        self.backward_hooks: list[tuple[str, Layer, Callable]] = []

    def attach(self, hooks: Hooks) -> None:
        """Note which hooks fire before this node's forward (its input's layer), after it (its output's layer)
        and after its backward (every member)."""
        first, last = self.members[0], self.members[-1]
        self.before_hooks = [(first[0], first[1], fn) for fn in hooks.functions("before_forward", first[0])]
        self.forward_hooks = [(last[0], last[1], fn) for fn in hooks.functions("after_forward", last[0])]
        self.backward_hooks = [(n, l, fn) for n, l in reversed(self.members)
                               for fn in hooks.functions("after_backward", n)]

    def unseen(self, hooks: Hooks, split_only: bool = False) -> list[str]:
        """Members with forward hooks this node cannot serve (their input or output is never written);
        with ``split_only`` just those whose hooks ask for a split."""
        want = hooks.forces_split if split_only else (lambda ev, n: bool(hooks.functions(ev, n)))
        return [n for n, _ in self.members
                if (n != self.output_of and want("after_forward", n)) or (n != self.input_of and want("before_forward", n))]

    def backward_and_update(self, dy, update):
        """``backward``, where the node may apply the optimizer's coming step (``update``) to its parameters
        inside it (only a single layer that knows how: ``Layer.backward_and_update``)."""
        return self.backward(dy)

    def fire_backward(self) -> None:
        for name, layer, fn in self.backward_hooks:
            fn(name, layer, layer_grads(name, layer))

    def skip_backward(self) -> None:
        """What a node before the plan's backward stop does instead of its backward: drop its cache and call
        its after_backward hooks (every member is frozen or has no parameters, so its grads are final)."""
        self.clear_cache()
        if self.backward_hooks:
            self.fire_backward()

    def has_trainable(self) -> bool:
        """Whether backward computes parameter gradients here (a member with trainable parameters)."""
        return any(layer.has_trainable() for _, layer in self.members)

    def frozen_note(self) -> str:
        """", frozen" when every member with parameters is frozen, ", frozen: a, b" when some are."""
        with_params = [(n, layer) for n, layer in self.members if layer.params]
        frozen = [n for n, layer in with_params if not layer.trainable]
        if not frozen:
            return ""
        if len(frozen) == len(with_params):
            return ", frozen (dL/dx only)"
        return f", frozen: {', '.join(frozen)} (dL/dx only)"

    def layers(self) -> list[Layer]:
        return [layer for _, layer in self.members]

    def samplewise(self) -> bool:
        return all(layer.samplewise for _, layer in self.members)

    def writes_conv_map(self) -> bool:
        """Whether a conv of this node writes its whole feature map (what makes chunks pay off)."""
        return any(layer.kind == "conv" for _, layer in self.members)

    def clear_cache(self) -> None:
        for _, layer in self.members:
            layer.clear_cache()

    def describe(self) -> str:
        return f"{self.label}: {self.how}{self.frozen_note()}"


class LayerNode(Node):
    """A layer run by its own forward and backward."""

    def __init__(self, name: str, layer: Layer):
        super().__init__([(name, layer)])
        self.layer = layer
        self.how = f"layer ({type(layer).__name__})"

    def forward(self, x, train):
        return self.layer.forward(x, train)

    def backward(self, dy):
        return self.layer.backward(dy)

    def backward_and_update(self, dy, update):
        return self.layer.backward_and_update(dy, update, f"{self.members[0][0]}.")

    def take_cache(self):
        return self.layer.take_cache()

    def put_cache(self, cache) -> None:
        self.layer.put_cache(cache)


class PoolReLU(Node):
    """A ReLU and the max-pool after it, run pool first (exactly the same values and gradients)."""

    how = "reordered: max-pool first, ReLU on the pooled map"

    def __init__(self, relu: tuple[str, Layer], pool: tuple[str, Layer]):
        super().__init__([relu, pool])
        self.relu, self.pool = relu[1], pool[1]

    def forward(self, x, train):
        return self.relu.forward(self.pool.forward(x, train), train)

    def backward(self, dy):
        return self.pool.backward(self.relu.backward(dy))

    def take_cache(self):
        return self.relu.take_cache(), self.pool.take_cache()

    def put_cache(self, cache) -> None:
        self.relu.put_cache(cache[0])
        self.pool.put_cache(cache[1])


class ConvPool(Node):
    """A Conv2D, an optional ReLU and a MaxPool2D as one native pass that never writes the conv's output.

    Forward: ``pool(relu(conv(x)))``, computed as ``relu(pool(conv(x)))`` (the two commute) with the conv's
    dot products done inside the pooling loop. Backward: the ReLU's, then each window's gradient to its
    winner; for a first layer (no dL/dx wanted) in one native pass into dW and db, else through the conv's
    own backward. Where the kernel does not apply (dtype, device, kernels turned off, out of memory) the
    layers run one by one inside the node, with the same results.

    Args:
        conv, relu, pool: (qualified name, layer) pairs; relu may be None. The layers must be built.
    """

    def __init__(self, conv: tuple[str, Conv2D], relu: tuple[str, ReLU] | None, pool: tuple[str, MaxPool2D]):
        super().__init__([conv] + ([relu] if relu is not None else []) + [pool])
        self.conv, self.pool = conv[1], pool[1]
        self.relu = relu[1] if relu is not None else None
        self.how = "fused native pass" + (" (ReLU on the pooled map)" if relu is not None else "")
        self._cache = None

    def writes_conv_map(self) -> bool:
        return False

    def forward(self, x, train):
        y = self._fused_forward(x)
        if y is None:  # the layers one by one
            y = self.pool.forward(self.conv.forward(x, train), train)
            self._cache = ("layers",)
            if self.relu is not None:
                y = self.relu.forward(y, train)
        return y

    def _fused_forward(self, x):
        conv, pool = self.conv, self.pool
        if x.dim() != 4 or tuple(x.shape[1:]) != conv.input_shape:
            return None
        fn = native.kernel("cd_conv_pool_fwd", x, conv.params["weight"])
        if fn is None:
            return None
        xp, (shape, pads, (ho, wo)) = conv.padded(x)
        n, f = shape[0], conv.filters
        _, po, qo = pool.compute_output_shape((f, ho, wo))
        (ph, pw), (sh, sw) = pool.pool_size, pool.stride
        w = conv.params["weight"].reshape(f, -1).contiguous()  # (F, C*kh*kw)
        bias = conv.params["bias"].contiguous() if conv.use_bias else None
        # reused from the last step inside train_step (see workspace.py); the conv layer outlives the plan
        out = workspace.empty(conv, "pooled", (n, f, po, qo), x.dtype, x.device)
        code = workspace.empty(conv, "winners", (n, f, po, qo), torch.uint8, x.device)
        # the patches are read from the input itself: no im2col (see the kernel's comment); the ReLU, when
        # there is one, is applied to the pooled values in the same pass
        failed = fn(xp.data_ptr(), w.data_ptr(), bias.data_ptr() if bias is not None else None, out.data_ptr(),
                    code.data_ptr(), n, f, shape[1], *conv.kernel_size, *xp.stride(), *xp.shape[2:],
                    *conv.stride, po, qo, ph, pw, sh, sw, *out.stride(), int(self.relu is not None),
                    native.threads())
        if failed:  # out of memory for the kernel's buffers: the layers run instead
            return None
        self._cache = ("fused", xp, code, shape, pads, (ho, wo), out if self.relu is not None else None)
        return out

    def backward(self, dy):
        cache, self._cache = self._cache, None
        if cache is None:
            raise RuntimeError(f"{self.label}: backward needs a forward first")
        if cache[0] == "layers":
            if self.relu is not None:
                dy = self.relu.backward(dy)
            return self.conv.backward(self.pool.backward(dy))
        _, xp, code, shape, pads, (ho, wo), y = cache
        if not self.conv.needs_input_grad:
            if not self.conv.trainable or self._fused_backward(dy, xp, code, shape, y):
                return None
        if y is not None:  # the ReLU's backward, from the output the fused pass kept
            self.relu.put_cache(y)
            dy = self.relu.backward(dy)
        # a frozen conv's backward below computes dL/dx only, without laying out the patches
        n, f = shape[0], self.conv.filters
        # the fused forward writes the codes (N, F, Po, Qo), the pool's backward reads them (N, Po, Qo, F)
        dz = backward_by_code(dy, code.permute(0, 2, 3, 1).contiguous(), (n, f, ho, wo), self.pool.pool_size,
                              self.pool.stride)
        self.conv.put_cache(("padded", xp, shape, pads, (ho, wo)))  # dW from the padded input
        return self.conv.backward(dz)

    def _fused_backward(self, dy, xp, code, shape, y) -> bool:
        """dW and db in one native pass for a first layer (through the ReLU too, from its output ``y``, when
        the node has one); False when the kernel cannot run (the caller takes the layers' backwards)."""
        conv, pool = self.conv, self.pool
        n, c = shape[0], shape[1]
        f = conv.filters
        po, qo = code.shape[2], code.shape[3]
        if tuple(dy.shape) != (n, f, po, qo):
            return False
        fn = native.kernel("cd_pool_conv_bwd", dy, xp)
        if fn is None:
            return False
        kh, kw = conv.kernel_size
        dw = torch.empty((f, c, kh, kw), dtype=dy.dtype, device=dy.device)
        db = torch.empty((f,), dtype=dy.dtype, device=dy.device) if conv.use_bias else None
        (ph, pw), (sh, sw) = pool.pool_size, pool.stride
        failed = fn(dy.data_ptr(), code.data_ptr(), y.data_ptr() if y is not None else None, xp.data_ptr(),
                    dw.data_ptr(),
                    db.data_ptr() if db is not None else None, n, f, c, kh, kw, *xp.stride(), *xp.shape[2:],
                    *conv.stride, po, qo, ph, pw, sh, sw, *dy.stride(), native.threads())
        if failed:
            return False
        conv.grads["weight"] = dw
        if db is not None:
            conv.grads["bias"] = db
        return True

    def take_cache(self):
        cache, self._cache = self._cache, None
        layers = tuple(layer.take_cache() for layer in self.layers())
        return cache, layers

    def put_cache(self, cache) -> None:
        self._cache, layers = cache
        for layer, c in zip(self.layers(), layers):
            layer.put_cache(c)

    def clear_cache(self) -> None:
        self._cache = None
        super().clear_cache()


class ResidualNode(Node):
    """A ``Residual`` block whose branch (and projection) run as plans: fused nodes and hooks inside too.

    The block's own ``forward_through`` / ``backward_through`` (the sum rule) run the plans of the branch and
    the projection, so the rule is written once, in ``Residual``.
    """

    how = "residual block"

    def __init__(self, name: str, block: Residual, hooks: Hooks, fusion: bool):
        super().__init__([(name, block)])
        self.block = block
        self.body = compile_plan(block.layers, hooks, fusion, chunk_size=0, prefix=f"{name}.")
        self.skip = None
        if block.projection is not None:
            self.skip = compile_plan([block.projection], hooks, fusion, chunk_size=0, prefix=f"{name}.")

    def forward(self, x, train):
        block = self.block
        if block.input_shape is not None and tuple(x.shape[1:]) != block.input_shape:
            return block.forward(x, train)  # raises the block's own message
        for layer in block.sublayers():
            layer.training = train
        skip = self.skip.forward if self.skip is not None else None
        return block.forward_through(x, self.body.forward, skip, train)

    def backward(self, dy):
        skip = self.skip.backward if self.skip is not None else None
        return self.block.backward_through(dy, self.body.backward, skip)

    def skip_backward(self) -> None:
        self.body.skip_backward()
        if self.skip is not None:
            self.skip.skip_backward()
        super().skip_backward()

    def has_trainable(self) -> bool:
        return self.block.has_trainable()

    def take_cache(self):
        raise RuntimeError("a Residual block never runs in chunks (it is not sample-wise)")

    put_cache = take_cache

    def clear_cache(self) -> None:
        self.body.clear_cache()
        if self.skip is not None:
            self.skip.clear_cache()
        super().clear_cache()

    def describe(self) -> str:
        inner = "; ".join(node.describe() for node in self.body.nodes)
        if self.skip is not None:
            inner += "; skip: " + "; ".join(node.describe() for node in self.skip.nodes)
        return f"{self.label}: {self.how} [{inner}]"


# -- fusion rules: each looks at the layers from position i and returns (node, layers taken) or None ----------

def _conv_pool(members, i, hooks, fusion):
    name, conv = members[i]
    if type(conv) is not Conv2D or i + 1 >= len(members):
        return None
    relu = None
    j = i + 1
    if type(members[j][1]) is ReLU:
        relu = members[j]
        j += 1
    if j >= len(members) or type(members[j][1]) is not MaxPool2D:
        return None
    if not conv.fuses_with(members[j][1]):
        return None
    return ConvPool(members[i], relu, members[j]), j - i + 1


def _pool_relu(members, i, hooks, fusion):
    if i + 1 < len(members) and type(members[i][1]) is ReLU and type(members[i + 1][1]) is MaxPool2D:
        return PoolReLU(members[i], members[i + 1]), 2
    return None


# Tried in this order at every position; the first that applies and that no hook splits wins.
FUSION_RULES = [_conv_pool, _pool_relu]


class Plan:
    """The compiled nodes of a list of layers, run forward in order and backward in reverse.

    Frozen layers (``trainable = False``) compute only dL/dx in their backward. When nobody asks for the
    plan's input gradient (the first layer's ``needs_input_grad`` is False, as in training), backward stops
    at the first node with trainable parameters (``first_trainable``): that node computes no dL/dx and the
    nodes before it run forward only (their caches are dropped and their after_backward hooks called with
    their zero gradients).

    Attributes:
        nodes: every node in order; the first ``len(head)`` form the chunked stage (when ``head`` is non-empty).
        head: the nodes that run chunk by chunk for batches larger than ``chunk_size``.
        notes: why a fusion did not happen (a hook that needs a layer's own output).
        first_trainable: index of the first node with trainable parameters (``len(nodes)`` when none has).
    """

    def __init__(self, nodes: list[Node], head_count: int, chunk_size: int, notes: list[str], settings: dict):
        self.nodes = nodes
        self.head = nodes[:head_count]
        self.rest = nodes[head_count:]
        self.chunk_size = chunk_size
        self.notes = notes
        self.settings = settings
        self.first_trainable = next((i for i, node in enumerate(nodes) if node.has_trainable()), len(nodes))
        self._chunks = None  # (per-chunk caches, chunk sizes) of a chunked forward

    def walk(self):
        """Every node in order, the nodes of the plans inside residual blocks (branch, then projection) right
        after their block's node."""
        for node in self.nodes:
            yield node
            for inner in (getattr(node, "body", None), getattr(node, "skip", None)):
                if inner is not None:
                    yield from inner.walk()

    def backward_start(self) -> int:
        """Index of the last node the next backward runs (0: all; ``len(nodes)``: none)."""
        if not self.nodes or self.nodes[0].members[0][1].needs_input_grad:
            return 0
        return self.first_trainable

    def forward(self, x: torch.Tensor, train: bool, fresh_output: bool = False) -> torch.Tensor:
        """Run every node; returns the last node's output. Keeps what ``backward`` needs.

        ``fresh_output``: the last node takes new memory for its output even inside an active workspace (the
        model's output leaves the plan: a loss function may keep it past the step)."""
        self._chunks = None
        if self.head and x.shape[0] > self.chunk_size:
            outs, caches, sizes = [], [], []
            with workspace.suspended():  # each chunk's buffers live until the backward: none is reused
                for piece in x.split(self.chunk_size):
                    sizes.append(piece.shape[0])
                    outs.append(_run(self.head, piece, train))
                    caches.append([node.take_cache() for node in self.head])
            x = torch.cat(outs)
            self._chunks = (caches, sizes)
            nodes = self.rest
        else:
            nodes = self.nodes
        if not fresh_output or not nodes:
            return _run(nodes, x, train)
        x = _run(nodes[:-1], x, train)
        with workspace.suspended():
            return _run(nodes[-1:], x, train)

    def backward(self, dy: torch.Tensor, update=None) -> torch.Tensor | None:
        """Propagate dL/doutput back through the nodes from the last to ``backward_start()``; after_backward
        hooks fire as grads become final (those of the nodes before the start after the start's).

        ``update`` (an ``optim.InlineAdam`` or None): the optimizer's coming step, offered to each node that
        runs its backward on the whole batch and has no after_backward hook (a hook reads the gradients a
        node that updates its weight itself never writes); the chunked stage's nodes, whose gradients are
        sums over chunks, are not offered it."""
        chunks, self._chunks = self._chunks, None
        stop = self.backward_start()
        if stop >= len(self.nodes):  # nothing trainable and no input gradient wanted
            self._skip(self.nodes)
            return None
        first = self.nodes[stop].members[0][1]
        wanted = first.needs_input_grad
        first.needs_input_grad = wanted and stop == 0  # the start node's input gradient has no reader
        try:
            if chunks is None:
                dx = _run_back(self.nodes[stop:], dy, update)
            else:
                k = len(self.head)
                dx = _run_back(self.rest[max(stop - k, 0):], dy, update)
                if stop < k:
                    with workspace.suspended():
                        dx = self._chunked_backward(dx, chunks, stop)
        finally:
            first.needs_input_grad = wanted
        self._skip(self.nodes[:stop])
        return dx

    def _chunked_backward(self, dy: torch.Tensor, chunks, stop: int) -> torch.Tensor | None:
        """The chunked stage's backward from its last node down to node ``stop``, chunk by chunk; the
        parameter gradients of its trainable layers summed over the chunks."""
        head = self.head[stop:]
        # Chunks of a gradient laid out batch-innermost (Dense's dx comes transposed) would be read with long
        # strides by every chunked layer; one copy first is cheaper (measured at batch 128).
        dy = dy.contiguous()
        layers = [layer for node in head for layer in node.layers() if layer.trainable]
        sums: list[dict[str, torch.Tensor]] = [{} for _ in layers]
        dxs = []
        start = 0
        for cache, size in zip(*chunks):
            for node, c in zip(head, cache[stop:]):
                node.put_cache(c)
            d = dy[start:start + size]
            start += size
            for node in reversed(head):
                d = node.backward(d)
            dxs.append(d)
            for acc, layer in zip(sums, layers):
                for key, g in layer.grads.items():
                    if key in acc:
                        acc[key].add_(g)
                    else:
                        acc[key] = g
        for acc, layer in zip(sums, layers):
            layer.grads.update(acc)
        for node in reversed(head):
            node.fire_backward()
        if dxs[0] is None:
            return None
        return torch.cat(dxs)

    def skip_backward(self) -> None:
        """Drop every cache and call every after_backward hook, running no backward (a frozen block)."""
        self._chunks = None
        self._skip(self.nodes)

    @staticmethod
    def _skip(nodes: list[Node]) -> None:
        for node in reversed(nodes):
            node.skip_backward()

    def clear_cache(self) -> None:
        self._chunks = None
        for node in self.nodes:
            node.clear_cache()

    def describe(self) -> list[str]:
        """The plan in words: one line per node, the chunked stage, and the splits hooks forced."""
        s = self.settings
        lines = [f"fusion {'on' if s['fusion'] else 'off'}, native kernels {'on' if s['native'] else 'off'}, "
                 + (f"chunks of {self.chunk_size}" if self.chunk_size else "no chunks")]
        for i, node in enumerate(self.nodes):
            mark = "  [chunked]" if i < len(self.head) else ""
            lines.append(f"  {node.describe()}{mark}")
        if self.head:
            lines.append(f"  chunked stage: {', '.join(n.label for n in self.head)} run in chunks of "
                         f"{self.chunk_size} examples when the batch is larger (a conv writes its whole map); "
                         f"after_forward hooks there see one chunk at a time")
        first = self.first_trainable
        if first >= len(self.nodes) and self.nodes:
            lines.append("  no trainable parameters: backward computes nothing unless dL/dinput is asked for")
        elif first:
            lines.append(f"  backward stops at {self.nodes[first].label} (the first node with trainable "
                         f"parameters; no dL/dx there): {', '.join(n.label for n in self.nodes[:first])} "
                         f"run forward only, unless dL/dinput is asked for")
        lines += [f"  {note}" for note in self.notes]
        return lines

    def __str__(self) -> str:
        return "\n".join(self.describe())

    __repr__ = __str__


def _run(nodes: list[Node], x: torch.Tensor, train: bool) -> torch.Tensor:
    for node in nodes:
        for name, layer, fn in node.before_hooks:
            fn(name, layer, x)
        x = node.forward(x, train)
        for name, layer, fn in node.forward_hooks:
            fn(name, layer, x)
    return x


def _run_back(nodes: list[Node], dy, update=None):
    for node in reversed(nodes):
        if node.backward_hooks:
            dy = node.backward(dy)
            node.fire_backward()
        elif update is not None:
            dy = node.backward_and_update(dy, update)
        else:
            dy = node.backward(dy)
    return dy


def compile_plan(layers: list[Layer], hooks: Hooks, fusion: bool, chunk_size: int, prefix: str = "") -> Plan:
    """Compile ``layers`` (built) into a plan.

    Args:
        hooks: the model's hooks; an after_forward hook that needs a fused layer's own output splits its node.
        fusion: False runs every layer on its own in written order (the reference the fused plan must match).
        chunk_size: examples per chunk of the leading sample-wise stage (0: no chunks).
        prefix: qualified-name prefix of the layers (a container's name and a dot).
    """
    members = [(f"{prefix}{layer.name}", layer) for layer in layers]
    nodes: list[Node] = []
    notes: list[str] = []
    i = 0
    while i < len(members):
        node, used = None, 1
        if fusion:
            for rule in FUSION_RULES:
                found = rule(members, i, hooks, fusion)
                if found is None:
                    continue
                candidate, taken = found
                blocked = candidate.unseen(hooks, split_only=True)
                if blocked:
                    notes.append(f"{candidate.label}: not fused ({candidate.how}): a forward hook needs "
                                 f"the input or output of {', '.join(blocked)}")
                    continue
                node, used = candidate, taken
                break
        if node is None:
            name, layer = members[i]
            node = ResidualNode(name, layer, hooks, fusion) if isinstance(layer, Residual) else LayerNode(name, layer)
        node.attach(hooks)
        unseen = node.unseen(hooks)
        if unseen:
            notes.append(f"{node.label}: forward hooks on {', '.join(unseen)} are not called (inside the "
                         f"fused node; registered with split=False)")
        nodes.append(node)
        i += used
    head = 0
    if chunk_size:
        while head < len(nodes) and nodes[head].samplewise():
            head += 1
        if not any(node.writes_conv_map() for node in nodes[:head]):
            head = 0
    settings = {"fusion": bool(fusion), "native": native.enabled() and native.library() is not None}
    return Plan(nodes, head, chunk_size, notes, settings)
