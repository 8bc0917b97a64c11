"""Call layouts: which arguments of a call become graph inputs, and which are traced as constants.

torch.fx turns every argument into a placeholder, so a flag like ``return_features=False`` would be
frozen at the value seen while tracing (or break the trace as soon as forward branches on it). A
layout instead describes one call: tensors (and anything else that is no plain Python scalar) are
graph inputs, nested tuples, lists and dicts are opened, and scalars (``None``, bools, ints,
floats, strings) are constants of the graph. A call with another layout is traced again, so every
value runs the code it would run eagerly.
"""

from __future__ import annotations

import inspect
import keyword
import re
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

Layout = tuple
"""Hashable: one node per parameter of the signature, in order (see :func:`_describe`)."""

_CONSTANT_TYPES = frozenset({type(None), bool, int, float, str})
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class CallSignature:
    """The signature of one method of a model, and the layouts of the calls made to it."""

    def __init__(self, function: Callable) -> None:
        parameters = list(inspect.signature(function).parameters.values())
        self.parameters = parameters[1:]  # without self
        self._positional_tensors: dict[int, tuple[Layout, tuple]] = {}

    def bind(self, args: tuple, kwargs: Mapping[str, Any]) -> tuple[Layout, list]:
        """``(layout, inputs)`` of a call: the graph for ``layout`` takes ``inputs``, in order.

        Raises ``TypeError`` as Python does when the arguments do not fit the signature.
        """
        if not kwargs and all(type(a) is torch.Tensor for a in args):
            cached = self._positional_tensors.get(len(args))
            if cached is not None:  # the common call, model(x): no binding needed
                return cached[0], [*args, *cached[1]]
        bound = inspect.Signature(self.parameters).bind(*args, **kwargs)
        bound.apply_defaults()
        inputs: list = []
        layout = tuple(_describe(bound.arguments[p.name], inputs) for p in self.parameters)
        if not kwargs and all(type(a) is torch.Tensor for a in args):
            self._positional_tensors[len(args)] = (layout, tuple(inputs[len(args):]))
        return layout, inputs

    def prefill(self) -> None:
        """Make the common call (a tensor for each required positional argument) take the fast path."""
        required = [p for p in self.parameters if p.default is inspect.Parameter.empty and p.kind in _POSITIONAL]
        try:
            self.bind(tuple(torch.empty(0) for _ in required), {})
        except TypeError:  # other required arguments: every call binds
            pass

    def default_layout(self) -> Layout:
        """The layout of a call that passes a tensor for every required argument and nothing else."""
        layout = []
        for p in self.parameters:
            if p.kind == inspect.Parameter.VAR_POSITIONAL:
                layout.append(("tuple", ()))
            elif p.kind == inspect.Parameter.VAR_KEYWORD:
                layout.append(("dict", ()))
            elif p.default is inspect.Parameter.empty:
                layout.append(("input",))
            else:
                layout.append(_describe(p.default, []))
        return tuple(layout)

    def root_function(self, method: Callable, layout: Layout, globals_: dict) -> Callable:
        """``forward(self, <one argument per graph input>)`` that calls ``method`` as the layout says.

        torch.fx traces this function: its arguments become the placeholders. It shares
        ``globals_`` with ``method`` (torch.fx wraps the functions it finds there, as it would when
        tracing ``method`` itself) and reads nothing from them.
        """
        names = _input_names(self.parameters, layout)

        def call(self_: object, inputs: tuple) -> object:
            values = iter(inputs)
            args: list = []
            kwargs: dict[str, Any] = {}
            for parameter, node in zip(self.parameters, layout):
                value = _rebuild(node, values)
                if parameter.kind in _POSITIONAL:
                    args.append(value)
                elif parameter.kind == inspect.Parameter.VAR_POSITIONAL:
                    args.extend(value)
                elif parameter.kind == inspect.Parameter.KEYWORD_ONLY:
                    kwargs[parameter.name] = value
                else:
                    kwargs.update(value)
            return method(self_, *args, **kwargs)

        arguments = ", ".join(["self", *names])
        packed = "".join(f"{n}, " for n in names)
        source = (
            f"def make(call):\n    def forward({arguments}):\n        return call(self, ({packed}))\n"
            "    return forward\n"
        )
        namespace: dict[str, Any] = {}
        exec(compile(source, "<tost_surgery layout>", "exec"), namespace)  # noqa: S102 - named placeholders for fx
        made = namespace["make"](call)
        return types.FunctionType(made.__code__, globals_, "forward", None, made.__closure__)

    def describe(self, layout: Layout) -> str:
        """The layout in words, for messages: ``x=<input>, flag=True``."""
        return ", ".join(f"{p.name}={_words(node)}" for p, node in zip(self.parameters, layout))


def _describe(value: object, inputs: list) -> tuple:
    """A hashable node for ``value``; its graph inputs are appended to ``inputs``."""
    kind = type(value)
    if kind in _CONSTANT_TYPES:
        return ("const", kind.__name__, repr(value) if kind is float else value)
    if kind is torch.Size:
        return ("const", "Size", tuple(value))
    if kind in (tuple, list):
        return (kind.__name__, tuple(_describe(v, inputs) for v in value))
    if kind is dict and all(type(k) is str for k in value):
        return ("dict", tuple((k, _describe(value[k], inputs)) for k in sorted(value)))
    inputs.append(value)
    return ("input",)


def _rebuild(node: tuple, inputs: Iterator) -> object:
    tag = node[0]
    if tag == "input":
        return next(inputs)
    if tag == "const":
        if node[1] == "float":
            return float(node[2])
        return torch.Size(node[2]) if node[1] == "Size" else node[2]
    if tag == "dict":
        return {k: _rebuild(child, inputs) for k, child in node[1]}
    children = [_rebuild(child, inputs) for child in node[1]]
    return tuple(children) if tag == "tuple" else children


def _input_names(parameters: Sequence[inspect.Parameter], layout: Layout) -> list[str]:
    """One identifier per graph input: the parameter's name, with the path inside it for nested inputs."""
    names: list[str] = []

    def walk(node: tuple, path: str) -> None:
        if node[0] == "input":
            name = re.sub(r"\W", "_", path)
            name = name if name.isidentifier() and not keyword.iskeyword(name) else f"arg_{name}"
            while name in names or name == "self":
                name += "_"
            names.append(name)
        elif node[0] == "dict":
            for key, child in node[1]:
                walk(child, f"{path}_{key}")
        elif node[0] in ("tuple", "list"):
            for i, child in enumerate(node[1]):
                walk(child, f"{path}_{i}")

    for parameter, node in zip(parameters, layout):
        walk(node, parameter.name)
    return names


def _words(node: tuple) -> str:
    tag = node[0]
    if tag == "input":
        return "<input>"
    if tag == "const":
        return str(node[2]) if node[1] != "str" else repr(node[2])
    if tag == "dict":
        return "{" + ", ".join(f"{k!r}: {_words(c)}" for k, c in node[1]) + "}"
    inner = ", ".join(_words(c) for c in node[1])
    return f"({inner})" if tag == "tuple" else f"[{inner}]"
