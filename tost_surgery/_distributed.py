"""Data-parallel training: every process must train the same sparse network."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ._errors import MaskError
from ._surgery import surgery_of


def check_masks_match(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Raise a :class:`MaskError` on every process if any process's masks differ from rank 0's.

    A collective: call it on every rank, after ``prepare`` and before wrapping. DDP copies rank
    0's parameters and buffers (masks included) into every replica when it wraps the model;
    FSDP2 (``fully_shard``) does not, so ranks that made different masks would train different
    networks without a word. Does nothing outside ``torch.distributed``.

    Example:
        >>> model = tost_surgery.prepare(model, tost_surgery.masks.erk(model, 0.9, seed=0), recipe)
        >>> tost_surgery.check_masks_match(model)
        >>> model = DistributedDataParallel(model)
    """
    surgery = surgery_of(model, "check_masks_match")
    if not (dist.is_available() and dist.is_initialized()):
        return
    entries = surgery.decided.entries
    masks = [entry.mask for entry in entries]
    device = masks[0].device
    local = torch.cat([m.reshape(-1) != 0 for m in masks]).to(torch.uint8)
    world = dist.get_world_size(group)
    # Same layout everywhere first: a broadcast of different sizes would hang.
    layout = torch.tensor([len(masks), local.numel()], device=device)
    layouts = [torch.empty_like(layout) for _ in range(world)]
    dist.all_gather(layouts, layout, group=group)
    if any(not torch.equal(other, layout) for other in layouts):
        raise MaskError(
            "Masks differ between processes: they cover different numbers of parameters "
            f"({[tuple(x.tolist()) for x in layouts]} as (masked parameters, weights) by rank).\n"
            "Hint: prepare the same model with the same mask on every rank."
        )
    reference = local.clone()
    dist.broadcast(reference, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    sizes = [m.numel() for m in masks]
    differs = torch.tensor(
        [not torch.equal(a, b) for a, b in zip(local.split(sizes), reference.split(sizes))], dtype=torch.uint8,
        device=device,
    )
    everyone = [torch.empty_like(differs) for _ in range(world)]
    dist.all_gather(everyone, differs, group=group)  # every rank learns the verdict, so all raise together
    bad = [(rank, int(i)) for rank, flags in enumerate(everyone) for i in flags.nonzero().flatten().tolist()]
    if bad:
        rank, index = bad[0]
        ranks = sorted({r for r, _ in bad})
        raise MaskError(
            f"Masks differ between processes: {entries[index].name!r} on rank {rank} is not rank 0's "
            f"({len(bad)} differing mask(s), on rank(s) {ranks}).\n"
            "Hint: make the mask with a fixed seed on every rank (e.g. masks.erk(model, 0.9, seed=0)), or on rank 0 "
            "and send it to the others with torch.distributed.broadcast_object_list, before prepare."
        )
