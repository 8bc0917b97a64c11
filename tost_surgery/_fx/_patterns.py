"""Recognizers over fx nodes that several passes share (passes never import each other)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ._ops import norm_of_norm_act

Modules = Mapping[str, nn.Module]

RELU_FUNCTIONS = frozenset({F.relu, F.relu_, torch.relu, torch.relu_})
RELU_METHODS = frozenset({"relu", "relu_"})
BATCH_NORM_FUNCTIONS = frozenset({F.batch_norm, torch.batch_norm, norm_of_norm_act})
# timm convs whose forward differs from nn.Conv2d's: same geometry from their attributes...
_STATIC_CONV_CLASSES = frozenset({"StdConv2d", "ScaledStdConv2d"})
# ...or TensorFlow-style "same" padding computed from the input size at every call.
_DYNAMIC_SAME_CONV_CLASSES = frozenset({"Conv2dSame", "Conv2dSameExport", "StdConv2dSame", "ScaledStdConv2dSame"})
NORM_FUNCTIONS = BATCH_NORM_FUNCTIONS | {F.layer_norm, F.group_norm, F.instance_norm}
NORM_MODULES = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)
# Ops through which "this layer's output is normalized" still holds: they commute with a
# positive rescaling of their input.
_SCALE_EQUIVARIANT_MODULES = (nn.ReLU, nn.Dropout, nn.Identity, nn.MaxPool2d, nn.AvgPool2d)
_INPLACE_OPERATORS = frozenset(
    {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.iand, operator.ior}
)


def module_of(node: fx.Node, modules: Modules) -> nn.Module | None:
    """The module a ``call_module`` node calls, else None."""
    return modules.get(node.target) if node.op == "call_module" else None  # type: ignore[arg-type]


def activation_site(node: fx.Node, modules: Modules) -> str | None:
    """``"relu"`` or ``"relu6"`` when ``node`` applies that activation (module, function, method,
    in-place or not), else None."""
    if node.op == "call_module":
        return {nn.ReLU: "relu", nn.ReLU6: "relu6"}.get(type(module_of(node, modules)))  # type: ignore[arg-type]
    if node.op == "call_function":
        if node.target in RELU_FUNCTIONS:
            return "relu"
        return "relu6" if node.target is F.relu6 else None
    if node.op == "call_method" and node.target in RELU_METHODS:
        return "relu"
    return None


def is_relu_site(node: fx.Node, modules: Modules) -> bool:
    """Whether ``node`` applies ReLU (not ReLU6)."""
    return activation_site(node, modules) == "relu"


def conv_padding_kind(module: nn.Module | None) -> str | None:
    """How a Conv2d pads: ``"static"`` (its attributes say), ``"dynamic_same"`` (timm's TF-style
    same padding), or None for a conv whose forward we cannot vouch for."""
    if not isinstance(module, nn.Conv2d):
        return None
    names = {cls.__name__ for cls in type(module).__mro__}
    if names & _DYNAMIC_SAME_CONV_CLASSES:
        return "dynamic_same"
    if type(module).forward is nn.Conv2d.forward or names & _STATIC_CONV_CLASSES:
        return "static"
    return None


def is_inplace(node: fx.Node, modules: Modules) -> bool:
    """Whether ``node`` writes into its first argument."""
    if node.op == "call_module":
        return bool(getattr(module_of(node, modules), "inplace", False))
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            return True
        if node.kwargs.get("inplace") is True:
            return True
        return node.target in (F.relu, F.relu6, F.hardtanh) and len(node.args) > 1 and node.args[-1] is True
    return False


def aliases(node: fx.Node, modules: Modules) -> list[fx.Node]:
    """``node`` and the nodes it is the same tensor as, through chains of in-place ops."""
    chain = [node]
    while is_inplace(chain[-1], modules) and chain[-1].args and isinstance(chain[-1].args[0], fx.Node):
        chain.append(chain[-1].args[0])
    return chain


def _normalized_input(node: fx.Node) -> object:
    """The tensor a norm node normalizes."""
    return node.args[1] if node.target is norm_of_norm_act else (node.args[0] if node.args else None)


def norm_after(node: fx.Node, modules: Modules) -> fx.Node | None:
    """The BatchNorm node that is the sole user of ``node``, if there is one."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if _normalized_input(user) is not node:
        return None
    if isinstance(module_of(user, modules), _BatchNorm):
        return user
    if user.op == "call_function" and user.target in BATCH_NORM_FUNCTIONS:
        return user
    return None


def feeds_normalization(node: fx.Node, modules: Modules) -> bool:
    """Whether ``node``'s output reaches a normalization layer, through scale-equivariant ops only."""
    current = node
    while len(current.users) == 1:
        user = next(iter(current.users))
        module = module_of(user, modules)
        if isinstance(module, NORM_MODULES) or (user.op == "call_function" and user.target in NORM_FUNCTIONS):
            return True
        if not (isinstance(module, _SCALE_EQUIVARIANT_MODULES) or is_relu_site(user, modules)):
            return False
        current = user
    return False


_ADD_FUNCTIONS = frozenset({operator.add, operator.iadd, torch.add})
_ADD_METHODS = frozenset({"add", "add_"})


def _is_tensor_addition(node: fx.Node) -> bool:
    """Whether ``node`` adds two computed tensors (not a tensor and a number or a parameter)."""
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )
    operands = node.args[:2]
    return is_add and len(operands) == 2 and all(isinstance(a, fx.Node) and a.op != "get_attr" for a in operands)


def feeds_residual_addition(node: fx.Node, modules: Modules) -> bool:
    """Whether ``node``'s output reaches an addition of two tensors (a residual branch's end, or a
    shortcut), through scale-equivariant ops only: then no norm sits between it and the sum.

    Like :func:`feeds_normalization`, it follows a chain of single users: a layer whose output
    also feeds something else (the stem of a pre-activation ResNet, read by the first block's
    norm and its identity skip) is the trunk, not a branch, and does not count.
    """
    current = node
    while len(current.users) == 1:
        user = next(iter(current.users))
        if _is_tensor_addition(user):
            return True
        if not (isinstance(module_of(user, modules), _SCALE_EQUIVARIANT_MODULES) or is_relu_site(user, modules)):
            return False
        current = user
    return False


def layers_where(graph: fx.Graph, modules: Modules, test: Callable[[fx.Node, Modules], bool]) -> frozenset[str]:
    """Modules every call of which passes ``test``."""
    calls: dict[str, list[bool]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(test(node, modules))
    return frozenset(name for name, passed in calls.items() if all(passed))


def residual_branch_ends(graph: fx.Graph, modules: Modules) -> frozenset[str]:
    """Modules whose output goes, with no norm between, into an addition with a skip path.

    Example:
        >>> residual_branch_ends(traced.graph, dict(model.named_modules()))  # pre-activation ResNet
        frozenset({'layer1.0.conv2', 'layer2.0.conv2', 'layer2.0.shortcut', ...})
    """
    return layers_where(graph, modules, feeds_residual_addition)


def on_every_path(graph: fx.Graph, targets: Iterable[str]) -> frozenset[str]:
    """Modules of ``targets`` that every path from the graph's inputs to its output goes through
    (called once: a module called twice is left out), as each layer of a plain chain is and a
    layer inside a residual branch is not.

    Example:
        >>> on_every_path(traced.graph, ["features.0", "layer1.0.conv1"])  # a VGG stem, a ResNet branch
        frozenset({'features.0'})
    """
    wanted = set(targets)
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in wanted:
            calls.setdefault(str(node.target), []).append(node)
    inputs = [node for node in graph.nodes if node.op == "placeholder"]
    output = next(node for node in graph.nodes if node.op == "output")
    once = {name: nodes[0] for name, nodes in calls.items() if len(nodes) == 1}
    return frozenset(name for name, node in once.items() if output not in _reachable(inputs, node))


def _reachable(starts: Iterable[fx.Node], avoiding: fx.Node) -> set[fx.Node]:
    """Nodes reachable from ``starts`` along users without passing through ``avoiding``."""
    seen: set[fx.Node] = set()
    stack = [node for node in starts if node is not avoiding]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(user for user in node.users if user is not avoiding)
    return seen
