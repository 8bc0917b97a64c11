"""Turn an fx graph into a plain ``forward(self, ...)`` that runs over the model itself."""

from __future__ import annotations

import itertools
import linecache
from collections.abc import Callable

from torch import fx

_counter = itertools.count()


def compile_forward(graph: fx.Graph, label: str) -> Callable:
    """Python function ``forward(self, *inputs)`` generated from ``graph``.

    ``self`` is the model whose module hierarchy the graph's targets name, so no module,
    parameter or buffer is copied. The source is registered with ``linecache`` so
    tracebacks show the generated lines, as ``GraphModule`` does.
    """
    code = graph.python_code(root_module="self")
    filename = f"<tost_surgery {label} #{next(_counter)}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(keepends=True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 - fx's own mechanism
    return namespace["forward"]
