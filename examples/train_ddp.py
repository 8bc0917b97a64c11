"""Train a sparse CNN with the ToST recipe under DistributedDataParallel.

Launch one process per device (CPU processes talk over gloo, GPUs over NCCL)::

    torchrun --nproc-per-node=2 examples/train_ddp.py --steps 40
    torchrun --nproc-per-node=2 examples/train_ddp.py --on-retire find-unused
    python examples/train_ddp.py            # one process, no torchrun needed

What to copy from here:

1. Every rank builds the same model (same seed); rank 0 makes the mask and broadcasts it, so
   every replica trains the same sparse network. Then ``prepare``, then wrap in DDP.
2. Bind the optimizer to the inner model (``tost.bind(model, optimizer)``), and read
   ``tost.label_smoothing(model)`` from it: the DDP wrapper has no ``tost`` attribute.
3. When the ghost skips retire, their parameters leave the graph and get no more gradients.
   DDP's default wrapper then averages nothing in that step (the replicas drift apart) and
   fails at the next one. Either wrap with ``find_unused_parameters=True`` from the start
   (an extra pass over the autograd graph every step), or, as done by default here, freeze the
   retired scaffolding and wrap the model again right after the step at which it retires.
4. Finalize the inner model on rank 0 and save its ``state_dict``: the original architecture
   loads it with ``strict=True``.

Synthetic data (a fixed random teacher labels random images): nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import tost_surgery as tost


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)) + x)
        return self.fc(x.mean(dim=(2, 3)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=32, help="global batch size (split across processes)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--on-retire", choices=["rewrap", "find-unused"], default="rewrap",
                        help="how DDP copes with the ghost skips leaving the graph")
    parser.add_argument("--out", type=Path, help="save the finalized state_dict here (rank 0)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes, or make a one-process group without it."""
    if "RANK" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def shared_mask(model: nn.Module, sparsity: float, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Rank 0 makes the mask; every rank receives the same one."""
    box = [tost.masks.erk(model, sparsity=sparsity, seed=seed) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def make_teacher(seed: int) -> nn.Module:
    """A fixed random linear map of each image's mean colour labels it (the same on every rank)."""
    torch.manual_seed(seed + 1)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10)).requires_grad_(False)


def batches(teacher: nn.Module, step: int, global_batch: int, rank: int, world: int, device: torch.device):
    """This rank's shard of the global batch of ``step`` (the same global batch on every rank)."""
    generator = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(global_batch, 3, 16, 16, generator=generator) + 2 * torch.randn(global_batch, 3, 1, 1,
                                                                                     generator=generator)
    with torch.no_grad():
        y = teacher(x).argmax(dim=1)
    per_rank = global_batch // world
    return x[rank * per_rank:(rank + 1) * per_rank].to(device), y[rank * per_rank:(rank + 1) * per_rank].to(device)


def wrap(model: nn.Module, device: torch.device, **kwargs) -> DDP:
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **kwargs)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world, device = init_distributed()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} does not split evenly across {world} processes")
    teacher = make_teacher(args.seed)
    torch.manual_seed(args.seed)
    model = SmallCNN().to(device)
    mask = shared_mask(model, args.sparsity, args.seed, device)
    recipe = tost.Recipe.tost(total_steps=args.steps)
    tost.prepare(model, mask, recipe)

    find_unused = args.on_retire == "find-unused"
    ddp = wrap(model, device, find_unused_parameters=find_unused)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    tost.bind(model, optimizer)  # the inner model: DDP has no ``tost`` attribute
    retire_at = recipe.warmup_steps("skips") if recipe.ghost_skips else None

    window = []
    for step in range(args.steps):
        x, y = batches(teacher, step, args.batch, rank, world, device)
        loss = F.cross_entropy(ddp(x), y, label_smoothing=tost.label_smoothing(model))
        window.append(loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()  # also advances the schedule; at ``retire_at`` the ghost skips leave the graph
        if not find_unused and step + 1 == retire_at:
            model.tost.requires_grad_(False)  # retired: a new wrapper must not wait for these gradients
            ddp = wrap(model, device)
        if rank == 0 and ((step + 1) % 10 == 0 or step == args.steps - 1):
            print(f"step {step + 1:4d}/{args.steps}  loss {sum(window) / len(window):.4f} (rank 0, mean since last)",
                  flush=True)
            window.clear()

    # Every replica holds the same weights, exactly (DDP averaged the same gradients everywhere).
    flat = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if not n.startswith("tost.")])
    spread = flat.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    identical = torch.tensor([float(torch.equal(spread, flat))], device=flat.device)
    dist.all_reduce(identical, op=dist.ReduceOp.MIN)

    if rank == 0:
        tost.finalize(model)
        kept = sum(int(dict(model.named_parameters())[name].count_nonzero()) for name in mask)
        total = sum(m.numel() for m in mask.values())
        exact = all(bool((dict(model.named_parameters())[name][~m.to(device)] == 0).all()) for name, m in mask.items())
        print(f"processes {world}  replicas identical: {'yes' if identical.item() == 1 else 'NO'}  "
              f"masked weights exactly zero: {'yes' if exact else 'NO'}  density {kept / total:.3f}", flush=True)
        if args.out is not None:
            torch.save(model.state_dict(), args.out)
            SmallCNN().load_state_dict(torch.load(args.out), strict=True)
            print(f"saved the finalized state_dict to {args.out} (loads strictly into SmallCNN)", flush=True)
    # Tear down while the interpreter is fully alive: free the DDP wrappers (the one replaced at
    # retirement may sit in a reference cycle), wait for rank 0, then destroy the group. A wrapper
    # left to interpreter finalization can abort in gloo ("terminate called without an active exception").
    del ddp
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
