"""Building an optional compiled kernel: once per process, and never an error for the caller."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from pathlib import Path

import torch

TORCH_DIR = str(Path(torch.__file__).resolve().parent)
"""The torch installation this process runs: its headers and libraries are what an extension builds against."""


def build_directory(name: str, torch_dir: str = TORCH_DIR) -> Path:
    """Where extension ``name`` is built: torch's extension cache, one folder per torch installation.

    torch keys its cache by name alone, while the build files it writes there name one
    installation's headers and libraries. Two environments sharing the cache (two virtual
    environments, or two checkouts each with its own) would rebuild the extension in turn, each new
    process waiting on a compile of a minute or more. ``TORCH_EXTENSIONS_DIR`` moves the cache, as
    it does torch's.

    Example:
        >>> build_directory("ext", "/env/a/torch") != build_directory("ext", "/env/b/torch")
        True
    """
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    installation = "\0".join((torch_dir, torch.__version__, sys.version))
    key = hashlib.sha1(installation.encode()).hexdigest()[:10]
    return root / f"py{sys.version_info.major}{sys.version_info.minor}" / f"{name}-{key}"


@functools.cache
def build_extension(name: str, source: str, functions: tuple[str, ...]) -> object:
    """The extension compiled from C++ ``source``, or the exception that stopped the build.

    ``torch.utils.cpp_extension.load_inline`` needs a C++ compiler and ninja. It builds in
    :func:`build_directory`, so a later process of the same environment only loads the build.

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
        directory = build_directory(name)
        directory.mkdir(parents=True, exist_ok=True)
        return load_inline(name=name, cpp_sources=source, functions=list(functions), extra_cflags=flags,
                           build_directory=str(directory), verbose=False)
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
