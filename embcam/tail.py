"""What a model does after the target layer: the tail that EmbeddingCAM differentiates.

EmbeddingCAM needs, for every image, M = mean_ij (dy/dA_.ij)^T (K x d), the spatial
mean of the Jacobian of the embedding y with respect to the target activation A. When
A reaches y only through its global average pool v = mean_ij A_.ij, then y = g(v) and

    M = J_g(v)^T / Z        (Z = h * w, the number of positions)

so M needs d vector-Jacobian products through g alone (a small graph on a K-vector),
not through the network after the target; and when g is affine (y = W v + b) it is
M = W^T / Z for every image (the paper's eq. 17): no backward pass at all.

``analyse_tail`` finds g with torch.fx: it traces the model with the target layer kept
as a leaf, checks that the target's output flows only into a global average pool over
its spatial dims, that nothing after the pool reads anything but the pool's output
(parameters, buffers and constants are fine) and that the output is one tensor, and
returns g as a module of the pooled (B, K) vectors. Anything else (GeM pooling, a skip
connection around the target, a target that runs twice, a model fx cannot trace, a
TorchScript model) gives None, and the caller keeps its general path.

The answer describes the model in eval mode, the mode EmbeddingCAM runs it in: the
trace is taken with every module in eval mode (flags restored afterwards), so
functional dropout is recorded as the identity, and Dropout / BatchNorm1d modules count
as affine by their eval-mode behaviour.
"""
from __future__ import annotations

import logging
import operator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

log = logging.getLogger(__name__)

LAYOUTS = ("nchw", "nhwc")
_AFFINE_MODULES = (nn.Linear, nn.BatchNorm1d, nn.Dropout, nn.Identity, nn.Flatten)
_RESHAPE_FUNCTIONS = (torch.flatten, torch.reshape)
_RESHAPE_METHODS = ("view", "reshape", "flatten")
_SHAPE_READS = ("size",)  # ints from the pooled tensor's shape, e.g. x.view(x.size(0), -1)


@dataclass(frozen=True)
class Tail:
    """y = head(v) with v = mean_ij A_.ij, the target's global average pool, (B, K).

    ``head`` maps pooled vectors (B, K) to embeddings (B, d); ``affine`` says it is an
    affine map (its W^T can be read off as head(I) - head(0))."""

    head: nn.Module
    affine: bool


def analyse_tail(model: nn.Module, target_name: str | None, layout: str = "nchw") -> Tail | None:
    """The tail of ``model`` after the layer ``target_name`` when it factors through the
    target's global average pool, else None.

    ``target_name=None`` analyses ``model.forward_head`` (the split of models with
    ``forward_features`` / ``forward_head``: the target is the features it is given).
    ``layout``: "nchw" for a (B, K, h, w) target output, "nhwc" for (B, h, w, K)
    (Swin): pooled by a permute to NCHW and a pool, or by a mean over dims (1, 2).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if isinstance(model, torch.jit.ScriptModule):
        return None
    root, target = (_HeadOf(model), "target") if target_name is None else (model, target_name)
    try:
        graph = _trace_in_eval_mode(root, target)
    except Exception as exc:  # noqa: BLE001 - untraceable models keep the general path
        log.debug("torch.fx cannot trace %s (%s: %s); using the general path",
                  type(model).__name__, type(exc).__name__, exc)
        return None
    return _tail_from_graph(root, graph, target, layout)


class _HeadOf(nn.Module):
    """forward_head of ``model`` behind a leaf named "target" that marks its input."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.target = model, nn.Identity()

    def forward(self, features):
        return self.model.forward_head(self.target(features))


class _PooledHead(nn.Module):
    """g: the graph after the pool, fed pooled (B, K) vectors in the pool's output shape."""

    def __init__(self, graph_module: fx.GraphModule, pooled_shape: tuple[int, ...]):
        super().__init__()
        self.graph_module, self.pooled_shape = graph_module, pooled_shape

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.graph_module(pooled.reshape(pooled.shape[0], *self.pooled_shape))


class _KeepTarget(fx.Tracer):
    def __init__(self, target: str):
        super().__init__()
        self.target = target

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name == self.target or super().is_leaf_module(module, qualified_name)


def _trace_in_eval_mode(root: nn.Module, target: str) -> fx.Graph:
    with _eval_mode(root):
        return _KeepTarget(target).trace(root)


@contextmanager
def _eval_mode(model: nn.Module):
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _tail_from_graph(root: nn.Module, graph: fx.Graph, target: str, layout: str) -> Tail | None:
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == target]
    if len(calls) != 1:
        return None  # the target does not run, or runs more than once
    pool, pooled_shape = _global_pool(root, calls[0], layout)
    if pool is None:
        return None
    output = next(n for n in graph.nodes if n.op == "output").args[0]
    if not isinstance(output, fx.Node):
        return None  # a tuple or dict of outputs
    head_graph = _graph_after(pool, output)
    if head_graph is None:
        return None
    head = fx.GraphModule(root, head_graph)  # shares the model's modules and parameters
    return Tail(_PooledHead(head, pooled_shape), _is_affine(head))


def _global_pool(root: nn.Module, target: fx.Node, layout: str) -> tuple[fx.Node | None, tuple[int, ...]]:
    """(the pool node, its output shape per image with -1 for K), or (None, ())."""
    node = _only_user(target)
    if layout == "nhwc" and node is not None and _is_permute_to_nchw(node, target):
        target, node, layout = node, _only_user(node), "nchw"
    shape = None if node is None else _pool_shape(root, node, target, layout)
    return (node, shape) if shape else (None, ())


def _pool_shape(root: nn.Module, node: fx.Node, source: fx.Node, layout: str) -> tuple[int, ...] | None:
    """The output shape per image (-1 for K) when ``node`` is a global average pool of
    ``source`` in ``layout``, else None."""
    if layout == "nchw" and _is_adaptive_pool_to_one(root, node, source):
        return (-1, 1, 1)
    mean = _mean_dims(node, source)
    if mean is None or mean[0] != ({2, 3} if layout == "nchw" else {1, 2}):
        return None
    if not mean[1]:
        return (-1,)
    return (-1, 1, 1) if layout == "nchw" else (1, 1, -1)


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _argument(node: fx.Node, position: int, name: str, default=None):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _reads_only(node: fx.Node, source: fx.Node) -> bool:
    """``source`` is the node's first argument and no other argument is a node."""
    return bool(node.args) and node.args[0] is source and node.all_input_nodes == [source]


def _is_permute_to_nchw(node: fx.Node, source: fx.Node) -> bool:
    is_permute = ((node.op == "call_method" and node.target == "permute")
                  or (node.op == "call_function" and node.target is torch.permute))
    if not (is_permute and _reads_only(node, source)):
        return False
    dims = node.args[1:] if len(node.args) > 2 else _argument(node, 1, "dims")
    return isinstance(dims, (list, tuple)) and [d % 4 for d in dims if isinstance(d, int)] == [0, 3, 1, 2]


def _is_adaptive_pool_to_one(root: nn.Module, node: fx.Node, source: fx.Node) -> bool:
    if not _reads_only(node, source):
        return False
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        return type(module) is nn.AdaptiveAvgPool2d and _is_one(module.output_size)
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        return _is_one(_argument(node, 1, "output_size"))
    return False


def _is_one(size) -> bool:
    return size == 1 or (isinstance(size, (list, tuple)) and list(size) == [1, 1])


def _mean_dims(node: fx.Node, source: fx.Node) -> tuple[set[int], bool] | None:
    """({dims mod 4}, keepdim) of a mean of ``source`` over two dims, else None."""
    is_mean = ((node.op == "call_method" and node.target == "mean")
               or (node.op == "call_function" and node.target is torch.mean))
    if not (is_mean and _reads_only(node, source)) or set(node.kwargs) - {"dim", "keepdim"}:
        return None
    dims, keepdim = _argument(node, 1, "dim"), _argument(node, 2, "keepdim", False)
    if not (isinstance(dims, (list, tuple)) and len(dims) == 2 and all(isinstance(d, int) for d in dims)):
        return None
    dims = {d % 4 for d in dims}
    return (dims, keepdim) if len(dims) == 2 and isinstance(keepdim, bool) else None


def _graph_after(pool: fx.Node, output: fx.Node) -> fx.Graph | None:
    """The graph computing ``output`` from ``pool`` (a placeholder), or None when the
    output also reads the model's input or any activation other than through the pool."""
    needed, stack, reaches_pool = set(), [output], False
    while stack:
        node = stack.pop()
        if node is pool:
            reaches_pool = True
            continue
        if node in needed:
            continue
        if node.op == "placeholder":
            return None  # another path from the input: a skip connection, a second use, ...
        needed.add(node)
        stack.extend(node.all_input_nodes)
    if not reaches_pool:
        return None
    graph = fx.Graph()
    env = {pool: graph.placeholder("pooled")}
    for node in pool.graph.nodes:  # topological order
        if node in needed:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[output])
    return graph


def _is_affine(head: fx.GraphModule) -> bool:
    """Every step is one of: Linear, BatchNorm1d with running statistics, Dropout,
    Identity, Flatten / flatten / view / reshape (in eval mode)."""
    for node in head.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.op == "call_module":
            module = head.get_submodule(node.target)
            if type(module) not in _AFFINE_MODULES:
                return False
            if type(module) is nn.BatchNorm1d and module.running_mean is None:
                return False  # batch statistics even in eval mode
        elif node.op == "call_method":
            if node.target not in _RESHAPE_METHODS + _SHAPE_READS:
                return False
        elif node.op == "call_function":
            if not (node.target in _RESHAPE_FUNCTIONS or _is_shape_read(node) or _is_eval_dropout(node)):
                return False
        else:
            return False
    return True


def _is_shape_read(node: fx.Node) -> bool:
    """x.size()[i]: an int, not a tensor."""
    source = node.args[0] if node.args else None
    return (node.target is operator.getitem and isinstance(source, fx.Node)
            and source.op == "call_method" and source.target in _SHAPE_READS)


def _is_eval_dropout(node: fx.Node) -> bool:
    """F.dropout(x, p, training=False): traced in eval mode, it is the identity."""
    return node.target is F.dropout and _argument(node, 2, "training", True) is False
