"""Graph passes: each is ``(graph, context) -> None`` and does one thing."""

from .ghost_neurons import insert_ghost_neurons
from .ghost_skips import insert_ghost_skips
from .sparse_kernels import route_to_kernels

__all__ = ["insert_ghost_neurons", "insert_ghost_skips", "route_to_kernels"]
