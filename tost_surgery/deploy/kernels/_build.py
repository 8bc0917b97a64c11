"""Building an optional compiled kernel: once per process, and never an error for the caller."""

from __future__ import annotations

import functools
import logging


@functools.cache
def build_extension(name: str, source: str, functions: tuple[str, ...]) -> object:
    """The extension compiled from C++ ``source``, or the exception that stopped the build.

    ``torch.utils.cpp_extension.load_inline`` needs a C++ compiler and ninja; torch caches the
    build on disk, so a later process only loads it.

    Example:
        >>> isinstance(build_extension("tost_example", "int one() { return 1; }", ("one",)), Exception)
        False
    """
    quiet = logging.getLogger("torch.utils.cpp_extension")  # it logs about CUDA on CPU-only machines
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load_inline

        flags = ["-O3", "-march=native"]
        return load_inline(name=name, cpp_sources=source, functions=list(functions), extra_cflags=flags, verbose=False)
    except Exception as error:  # no compiler, no ninja, a failed build: the torch-only path runs
        return error
    finally:
        quiet.setLevel(level)


def availability(extension: object) -> tuple[bool, str]:
    """``(True, "")`` for a built extension, else ``(False, the exception's type and first line)``."""
    if isinstance(extension, Exception):
        first_line = str(extension).strip().splitlines()[0] if str(extension).strip() else ""
        return False, f"{type(extension).__name__}: {first_line}"
    return True, ""
