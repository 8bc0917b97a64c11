"""Peak memory of a training step of each variant, for ``benchmarks/overhead.py``.

On CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the variant was
built. On CPU: ``static + transient``, where ``static`` counts the distinct storages the model
holds between steps and ``transient`` is the peak rise of the anonymous resident size during the
steps, sampled by a thread in a forked child (see ``overhead.py``'s docstring for why).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import threading
import time
from typing import Any

import torch
from overhead_variants import Stepper, batch, make_variant, seeded_model_and_mask
from torch import nn


def _rss_bytes() -> int:
    """Anonymous resident memory (statm's resident minus shared: the code pages of torch's
    libraries, paged in as kernels are first used, are file-backed and left out)."""
    with open("/proc/self/statm") as handle:
        fields = handle.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


class RssSampler(threading.Thread):
    """Samples the resident set size until stopped; ``peak`` is the largest sample."""

    def __init__(self, interval: float = 2e-4) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.samples = interval, _rss_bytes(), 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self.samples += 1
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, _rss_bytes())
        return self.peak


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _libc_release_and_follow() -> None:
    """Give freed heap pages back to the OS, and from now on mmap every new block of 64 KiB or more.

    With a fixed mmap threshold glibc returns each freed tensor to the OS at once, so the
    resident size follows the live tensors instead of glibc's high-water mark. Blocks already
    in glibc's free lists are still reused first; ``malloc_trim`` has released their pages, so
    touching them again raises the resident size as a new allocation would.
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    libc.mallopt(_M_MMAP_THRESHOLD, 65536)
    libc.mallopt(_M_TRIM_THRESHOLD, 0)


def tensor_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages alive between steps: parameters, buffers (masks), tensors kept as
    plain attributes (``torch.nn.utils.prune``'s ``weight``) or elsewhere, gradients, optimizer state.

    Call it where the only other live tensors are the batch (counted too: the same for every variant).
    """
    tensors: list[torch.Tensor] = []
    for module in model.modules():
        tensors += [t for t in module._parameters.values() if t is not None]
        tensors += [t for t in module._buffers.values() if t is not None]
        tensors += [t for t in module.__dict__.values() if isinstance(t, torch.Tensor)]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    # Tensors held outside modules (e.g. the library's own copy of each mask).
    tensors += [t for t in gc.get_objects() if type(t) is torch.Tensor]  # type(): no lazy-module warnings
    tensors += [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _memory_in_child(name: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Static bytes (counted) + the peak rise of anonymous RSS during steps 2.. (sampled)."""
    gc.collect()
    _libc_release_and_follow()
    x, y = batch(args.batch, args.image_size, "cpu")
    base, mask = seeded_model_and_mask(name, args.image_size, args.sparsity)
    stepper = Stepper(make_variant(variant, base, mask, args.tost_overrides), x, y)
    del base, mask
    stepper()  # creates gradients and optimizer state; one-time initialization stays out
    gc.collect()
    static = tensor_bytes(stepper.model, stepper.optimizer)
    # Blocks freed into glibc's bins (by that step, or inherited from the parent's heap) are
    # reused before any new mmap: give their pages back, so that reusing them counts again.
    _libc_release_and_follow()
    before = _rss_bytes()
    sampler = RssSampler()
    sampler.start()
    for _ in range(max(1, args.memory_steps - 1)):
        stepper()
    transient = sampler.stop() - before
    return {
        "peak_bytes": static + transient,
        "static_bytes": static,
        "transient_bytes": transient,
        "samples": sampler.samples,
    }


def measure_memory_cpu(name: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Peak memory of each variant, each in a forked child (a fresh heap, the parent's imports already done)."""
    results = {}
    for v in args.variants:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(read_end)
            try:
                payload = json.dumps(_memory_in_child(name, v, args))
            except BaseException as error:  # noqa: BLE001 - reported by the parent
                payload = json.dumps({"error": repr(error)})
            os.write(write_end, payload.encode())
            os.close(write_end)
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            payload = pipe.read()
        os.waitpid(pid, 0)
        result = json.loads(payload or '{"error": "child died"}')
        if "error" in result:
            raise RuntimeError(f"memory measurement of {name} ({v}) failed: {result['error']}")
        results[v] = result
    return results


def measure_memory_cuda(name: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Peak memory of each variant from the CUDA allocator's statistics, in this process."""
    results = {}
    x, y = batch(args.batch, args.image_size, args.device)
    for v in args.variants:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        base, mask = seeded_model_and_mask(name, args.image_size, args.sparsity)
        base.to(args.device)
        mask = {k: m.to(args.device) for k, m in mask.items()}
        model = make_variant(v, base, mask, args.tost_overrides)
        del base, mask
        gc.collect()
        stepper = Stepper(model, x, y)
        stepper()
        torch.cuda.synchronize()
        static = tensor_bytes(stepper.model, stepper.optimizer)
        torch.cuda.reset_peak_memory_stats()
        for _ in range(max(1, args.memory_steps - 1)):
            stepper()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        results[v] = {"peak_bytes": peak, "static_bytes": static, "transient_bytes": peak - static}
        del model, stepper
    return results


def measure_memory(name: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Peak memory of a training step of each variant of ``name`` on ``args.device``."""
    measure = measure_memory_cuda if args.device.startswith("cuda") else measure_memory_cpu
    return measure(name, args)
