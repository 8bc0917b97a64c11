"""Data-parallel training on CPU (gloo, two local processes): DDP and FSDP2 match one process.

Each test starts ``WORLD`` processes on 127.0.0.1 (forked from a fork server that imported torch
once, where the platform has one: a spawned child re-imports torch, which costs seconds), runs one
scenario in each and saves what it saw to ``tmp_path``; the assertions run here. The one-process reference sees the same
global batch as the same per-rank shards (``WORLD`` micro-batches, gradients accumulated), so
each BatchNorm, the ghost skips' own included, normalizes over the same samples as under DDP;
SyncBatchNorm, which would normalize over the global batch, runs only on GPUs.

What happens at retirement: the ghost skips leave the graph, so their parameters get no
gradient. DDP's default wrapper then finishes the step after retirement without averaging the
gradients (the replicas silently diverge) and raises at the next forward; ``static_graph=True``
fails the same way. Two ways work: ``find_unused_parameters=True``, or re-wrapping the model
once the skips retire with their parameters frozen (so the new wrapper leaves them out).
FSDP2 needs nothing at retirement, but ``fully_shard`` must go on modules the rewritten graph
calls (or the root): a block that torch.fx traced through never runs its own forward, so its
hooks never gather its parameters.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import tost_surgery as tost
from tost_surgery import Recipe
from tost_surgery._sparse_kernels.native import training_native_available

from .conftest import bernoulli_mask

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this build of torch",
)

WORLD = 2
SHARD = 4
STEPS = 6
RECIPE = dict(total_steps=8, warmup=0.5, neuron_warmup=0.25)
"""Ghost neurons retire after 2 optimizer steps, ghost skips after 4 (of the ``STEPS`` run)."""
TIMEOUT_S = 150
START_METHOD = "forkserver" if sys.platform.startswith("linux") else "spawn"
"""Not "fork": a test earlier in the same process may have started autograd's worker threads (``torch.export``
does), after which a forked child's backward raises "Unable to handle autograd's threading in combination
with fork-based multiprocessing". The fork server starts clean, imports torch once, and forks from there."""
ATOL = 1e-5
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_ddp.py"


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    """A stem conv without a norm, two conv-BN-ReLU blocks, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(F.relu(self.stem(x))).mean(dim=(2, 3)))


def build(
    mask_seed: int = 0, recipe: Recipe | None = None, kernels: str = "off", native: bool = False
) -> tuple[Net, dict[str, torch.Tensor]]:
    """What every process does first: the same seed, model, mask and recipe."""
    torch.manual_seed(0)
    model = Net()
    mask = bernoulli_mask(model, density=0.5, seed=mask_seed)
    tost.prepare(model, mask, recipe or Recipe.tost(**RECIPE), sparse_kernels=kernels, native_kernels=native)
    return model, mask


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(WORLD * SHARD, 3, 8, 8, generator=generator), torch.randint(0, 4, (WORLD * SHARD,),
                                                                                     generator=generator)


def shard(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(step)
    return x[rank * SHARD:(rank + 1) * SHARD], y[rank * SHARD:(rank + 1) * SHARD]


EVAL_BATCH = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(7))


def loss_of(model: nn.Module, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, label_smoothing=tost.label_smoothing(model))


def live_masks(model: nn.Module, mask: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The masks the model multiplies by (its parametrizations' buffers), by parameter name."""
    masks = {}
    for name in mask:
        module_name, attr = name.rsplit(".", 1)
        masks[name] = model.get_submodule(module_name).parametrizations[attr][0].mask.detach().clone()
    return masks


def scaffolding_called(model: nn.Module) -> set[str]:
    """Scaffolding modules the current graph calls: empty once the ghost skips retired (sparse kernels aside)."""
    nodes = tost.graph(model).graph.nodes
    return {
        str(n.target)
        for n in nodes
        if n.op == "call_module" and str(n.target).startswith("tost.") and not str(n.target).startswith("tost.kernels.")
    }


def record(model: nn.Module, mask: dict[str, torch.Tensor], log: dict) -> dict:
    """What a run leaves behind, comparable across processes."""
    masks = live_masks(model, mask)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    effective_zero = all(
        bool((model.get_submodule(n.rsplit(".", 1)[0]).weight.detach()[~m.bool()] == 0).all()) for n, m in mask.items()
    )
    model.eval()
    with torch.no_grad():
        out = model(EVAL_BATCH)
    model.train()
    kernels = list(tost.status(model).sparse_kernels.values())
    return dict(log, state=state, masks=masks, effective_zero=effective_zero, eval=out, kernels=kernels)


def reference_run(recipe: Recipe | None = None) -> dict:
    """One process, the global batch of each step as ``WORLD`` accumulated micro-batches.

    DDP broadcasts rank 0's buffers at each forward, so BatchNorm running statistics follow
    rank 0's shard only: the other shards' updates are undone here.
    """
    model, mask = build(recipe=recipe)
    optimizer = make_optimizer(model)
    tost.bind(model, optimizer)
    log: dict[str, list] = {"losses": [], "steps": [], "active": [], "smoothing": []}
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for rank in range(WORLD):
            saved = {k: b.clone() for k, b in model.named_buffers()}
            x, y = shard(step, rank)
            loss = loss_of(model, model(x), y)
            (loss / WORLD).backward()
            losses.append(loss.item())
            if rank > 0:
                with torch.no_grad():
                    for k, b in model.named_buffers():
                        b.copy_(saved[k])
        optimizer.step()
        log["losses"].append(losses)
        log["steps"].append(model.tost.schedule.steps_taken)
        log["active"].append(sorted(scaffolding_called(model)))
        log["smoothing"].append(tost.label_smoothing(model))
    return record(model, mask, log)


# --- scenarios, run in every process -------------------------------------------------------------------------------


def _train_ddp(rank: int, *, wrap: Callable[[nn.Module], nn.Module], rewrap: Callable | None = None,
               mask_seed: int = 0, **built) -> dict:  # noqa: ANN003
    model, mask = build(mask_seed, **built)
    ddp = wrap(model)
    optimizer = make_optimizer(model)
    tost.bind(model, optimizer)
    log: dict[str, list] = {"losses": [], "steps": [], "active": [], "smoothing": [], "rewrapped_at": []}
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        x, y = shard(step, rank)
        loss = loss_of(model, ddp(x), y)
        loss.backward()
        optimizer.step()  # bound: advances the schedule, which may retire the ghost skips
        log["losses"].append(loss.item())
        log["steps"].append(model.tost.schedule.steps_taken)
        log["active"].append(sorted(scaffolding_called(model)))
        log["smoothing"].append(tost.label_smoothing(model))
        if rewrap is not None:
            new = rewrap(model, ddp)
            if new is not ddp:
                log["rewrapped_at"].append(step)
                ddp = new
    return record(model, mask, log)


def _ddp(**kwargs) -> Callable[[nn.Module], nn.Module]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return lambda model: DDP(model, **kwargs)


def _rewrap_when_skips_retire(*, freeze: bool) -> Callable:
    """After the step at which the ghost skips retire, wrap the model again.

    ``freeze``: set ``requires_grad=False`` on the scaffolding first (what the user does today;
    without it the new wrapper still waits for their gradients).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    retire_at = Recipe.tost(**RECIPE).warmup_steps("skips")

    def rewrap(model: nn.Module, ddp: nn.Module) -> nn.Module:
        if model.tost.schedule.steps_taken != retire_at:
            return ddp
        if freeze:
            model.tost.requires_grad_(False)
        return DDP(model)

    return rewrap


def scenario_find_unused(rank: int) -> dict:
    return _train_ddp(rank, wrap=_ddp(find_unused_parameters=True))


def scenario_sparse_kernels(rank: int) -> dict:
    """Masks only, every masked layer on the sparse kernels, plain DDP."""
    return _train_ddp(rank, wrap=_ddp(), recipe=Recipe.baseline(), kernels="on")


def scenario_native_kernels(rank: int) -> dict:
    """Masks only, the 3x3 convs on the compiled kernels (the head on the torch-only ones), plain DDP."""
    return _train_ddp(rank, wrap=_ddp(), recipe=Recipe.baseline(), kernels="on", native=True)


def scenario_rewrap(rank: int) -> dict:
    return _train_ddp(rank, wrap=_ddp(), rewrap=_rewrap_when_skips_retire(freeze=True))


def scenario_rewrap_without_freezing(rank: int) -> dict:
    return _train_ddp(rank, wrap=_ddp(), rewrap=_rewrap_when_skips_retire(freeze=False))


def scenario_default_wrapper(rank: int) -> dict:
    """Plain ``DDP(model)`` through retirement: where it fails and what the replicas look like."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}
    for kind, kwargs in (("default", {}), ("static_graph", {"static_graph": True})):
        model, mask = build()
        ddp = DDP(model, **kwargs)
        optimizer = make_optimizer(model)
        tost.bind(model, optimizer)
        failed_at, message, digests = None, "", []
        for step in range(STEPS):
            try:
                optimizer.zero_grad(set_to_none=True)
                x, y = shard(step, rank)
                loss_of(model, ddp(x), y).backward()
            except RuntimeError as error:
                failed_at, message = step, str(error)
                break
            optimizer.step()
            digests.append(torch.cat([p.detach().flatten() for n, p in model.named_parameters()
                                      if not n.startswith("tost.")]))
        results[kind] = dict(failed_at=failed_at, message=message, digests=digests)
    return results


def scenario_masks_differ(rank: int) -> dict:
    """Each rank builds its own mask (a different seed on rank 1), then wraps in DDP."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, mask = build(mask_seed=rank)
    before = live_masks(model, mask)
    DDP(model)
    return dict(before=before, after=live_masks(model, mask), own=mask)


def scenario_check_masks(rank: int) -> dict:
    """The library's check, with equal masks and with a different mask on rank 1."""
    outcome = {}
    for label, seed in (("same", 0), ("different", rank)):
        model, _ = build(mask_seed=seed)
        try:
            tost.check_masks_match(model)
            outcome[label] = None
        except tost.TostSurgeryError as error:
            outcome[label] = (type(error).__name__, str(error))
    return outcome


def scenario_fsdp2(rank: int) -> dict:
    """FSDP2: the model alone, then each module the graph calls; finalize from the full state_dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    results = {}
    for layout in ("root", "called_modules"):
        model, mask = build()
        if layout == "called_modules":
            for name in sorted(n.target for n in tost.graph(model).graph.nodes if n.op == "call_module"):
                module = model.get_submodule(name)
                if any(True for _ in module.parameters()):
                    fully_shard(module)
        fully_shard(model)
        optimizer = make_optimizer(model)
        tost.bind(model, optimizer)
        log: dict[str, list] = {"losses": [], "steps": [], "active": []}
        for step in range(STEPS):
            optimizer.zero_grad(set_to_none=True)
            x, y = shard(step, rank)
            loss = loss_of(model, model(x), y)
            loss.backward()
            optimizer.step()
            log["losses"].append(loss.item())
            log["steps"].append(model.tost.schedule.steps_taken)
            log["active"].append(sorted(scaffolding_called(model)))
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        state = {k: v.detach().clone() for k, v in state.items()}
        # A plain (unsharded) prepared model takes the full state_dict; finalize that one.
        plain, _ = build()
        plain.load_state_dict(state, strict=True)
        plain.eval()
        with torch.no_grad():
            prepared_out = plain(EVAL_BATCH)
        tost.finalize(plain)
        fresh = Net()
        fresh.load_state_dict(plain.state_dict(), strict=True)
        fresh.eval()
        with torch.no_grad():
            finalized_out = fresh(EVAL_BATCH)
        effective_zero = all(bool((dict(fresh.named_parameters())[n][~m] == 0).all()) for n, m in mask.items())
        results[layout] = dict(log, state=state, prepared_out=prepared_out, finalized_out=finalized_out,
                               effective_zero=effective_zero)
    return results


def scenario_fsdp2_traced_through_block(rank: int) -> dict:
    """fully_shard on a block that torch.fx traced through (its forward is never called), and on a
    block kept whole with ``leaf_modules`` (called, so sharded fine, but with no scaffolding inside)."""
    from torch.distributed.fsdp import fully_shard

    results = {}
    for layout in ("leaf_blocks", "traced_blocks"):
        torch.manual_seed(0)
        model = Net()
        leaves = [Block] if layout == "leaf_blocks" else []
        tost.prepare(model, bernoulli_mask(model), Recipe.tost(**RECIPE), leaf_modules=leaves)
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        try:
            x, y = shard(0, rank)
            loss_of(model, model(x), y).backward()
            results[layout] = None
        except RuntimeError as error:
            results[layout] = str(error)
    return results


# --- the harness ---------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process(rank: int, scenario: str, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's own connections on the loopback interface
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        try:
            result = globals()[f"scenario_{scenario}"](rank)
        except Exception:  # noqa: BLE001 - reported to the test, which decides
            result = {"crashed": traceback.format_exc()}
        torch.save(result, Path(out_dir) / f"{scenario}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_processes(scenario: str, tmp_path: Path) -> list[dict]:
    """Run ``scenario_<scenario>`` in ``WORLD`` local processes; their results, by rank."""
    import torch._dynamo  # noqa: F401 - DDP imports it: once here, not once per process
    import torch.distributed.fsdp  # noqa: F401

    if START_METHOD == "forkserver":
        mp.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed.fsdp", "tost_surgery", __name__])

    context = mp.start_processes(
        _process, args=(scenario, _free_port(), str(tmp_path)), nprocs=WORLD, join=False, start_method=START_METHOD
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=0.5):
            if time.monotonic() > deadline:
                pytest.fail(f"{scenario}: {WORLD} processes did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    results = [torch.load(tmp_path / f"{scenario}-{rank}.pt", weights_only=False) for rank in range(WORLD)]
    return results


def assert_no_crash(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        assert "crashed" not in result, f"rank {rank}:\n{result.get('crashed')}"


def is_statistic(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def assert_matches_reference(result: dict, reference: dict, *, rank: int) -> None:
    """Parameters, schedule and masks on every rank; BatchNorm statistics (and so eval outputs) on rank 0.

    DDP broadcasts rank 0's buffers at the start of each forward; the other ranks then update
    theirs with their own shard, so only rank 0's statistics follow the reference between steps.
    """
    assert result["steps"] == reference["steps"]
    assert result["active"] == reference["active"]
    assert result["smoothing"] == reference["smoothing"]
    assert result["effective_zero"]
    assert result["state"].keys() == reference["state"].keys()
    for key, value in reference["state"].items():
        if rank == 0 or not is_statistic(key):
            torch.testing.assert_close(result["state"][key], value, rtol=0, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}")
    if rank == 0:
        torch.testing.assert_close(result["eval"], reference["eval"], rtol=0, atol=ATOL)


@pytest.fixture(scope="module")
def reference() -> dict:
    return reference_run()


def test_ddp_matches_one_process_through_retirement(tmp_path, reference) -> None:
    """find_unused_parameters=True: same parameters, statistics, schedule and masks as one process."""
    results = run_processes("find_unused", tmp_path)
    assert_no_crash(results)
    assert reference["active"][0] and not reference["active"][-1]  # the skips retired mid-run
    for rank, result in enumerate(results):
        assert_matches_reference(result, reference, rank=rank)
        for step, losses in enumerate(reference["losses"]):
            assert result["losses"][step] == pytest.approx(losses[rank], abs=ATOL)
    first, second = results
    for key, value in first["state"].items():  # replicas are identical, bit for bit
        if not is_statistic(key):
            assert torch.equal(value, second["state"][key]), key
    for name, mask in first["masks"].items():
        assert torch.equal(mask, second["masks"][name]) and set(mask.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize(
    ("scenario", "kernels"), [("sparse_kernels", ["sparse"] * 4), ("native_kernels", ["native"] * 3 + ["sparse"])]
)
def test_ddp_on_sparse_kernels_matches_one_process_on_the_dense_path(tmp_path, scenario: str, kernels: list) -> None:
    """The kernels change how gradients are computed, not what DDP averages or the optimizer sees."""
    if scenario == "native_kernels":  # built here once, so the processes only load it
        available, why = training_native_available()
        if not available:
            pytest.skip(f"no C++ toolchain here: {why}")
    results = run_processes(scenario, tmp_path)
    assert_no_crash(results)
    reference = reference_run(Recipe.baseline())  # sparse_kernels="off"
    for rank, result in enumerate(results):
        assert result["kernels"] == kernels
        assert_matches_reference(result, reference, rank=rank)
        for step, losses in enumerate(reference["losses"]):
            assert result["losses"][step] == pytest.approx(losses[rank], abs=ATOL)


def test_ddp_rewrapped_when_the_skips_retire(tmp_path, reference) -> None:
    """Full-speed DDP: freeze the retired scaffolding, wrap again; the run equals the reference."""
    results = run_processes("rewrap", tmp_path)
    assert_no_crash(results)
    retire_at = Recipe.tost(**RECIPE).warmup_steps("skips")
    for rank, result in enumerate(results):
        assert result["rewrapped_at"] == [retire_at - 1]
        assert_matches_reference(result, reference, rank=rank)


def test_ddp_rewrapped_without_freezing_by_hand(tmp_path, reference) -> None:
    results = run_processes("rewrap_without_freezing", tmp_path)
    assert_no_crash(results)
    for rank, result in enumerate(results):
        assert_matches_reference(result, reference, rank=rank)


def test_default_ddp_fails_after_retirement(tmp_path) -> None:
    """What plain DDP does when the ghost skips retire: the documented reason for the two ways above."""
    results = run_processes("default_wrapper", tmp_path)
    assert_no_crash(results)
    retire_at = Recipe.tost(**RECIPE).warmup_steps("skips")
    for result in results:
        default, static = result["default"], result["static_graph"]
        assert default["failed_at"] == retire_at + 1
        assert "parameters that were not used in producing loss" in default["message"]
        assert static["failed_at"] == retire_at + 1
        assert "static_graph" in static["message"]
    # The first step after retirement ran on unaveraged gradients: the replicas drifted apart silently.
    digests = [result["default"]["digests"] for result in results]
    assert all(torch.equal(a, b) for a, b in zip(digests[0][:retire_at], digests[1][:retire_at]))
    assert not torch.equal(digests[0][retire_at], digests[1][retire_at])


def test_ddp_broadcasts_rank_0_masks(tmp_path) -> None:
    """DDP copies rank 0's parameters and buffers, masks included, into every replica at wrap time."""
    results = run_processes("masks_differ", tmp_path)
    assert_no_crash(results)
    first, second = results
    assert any(not torch.equal(first["before"][n], second["before"][n]) for n in first["before"])
    for name, mask in first["after"].items():
        assert torch.equal(second["after"][name], mask)
        assert torch.equal(mask.bool(), first["own"][name])


def test_check_masks_match_names_the_layer_on_every_rank(tmp_path) -> None:
    results = run_processes("check_masks", tmp_path)
    assert_no_crash(results)
    for result in results:
        assert result["same"] is None
        kind, message = result["different"]
        assert kind == "MaskError"
        assert "stem.weight" in message and "rank 1" in message and "Hint:" in message


@pytest.mark.parametrize("call", [tost.label_smoothing, tost.step, tost.finalize], ids=["label_smoothing", "step",
                                                                                        "finalize"])
def test_calls_on_a_wrapper_point_to_the_prepared_model(call) -> None:
    """DDP and DataParallel keep the prepared model as ``.module``; DataParallel needs no process group."""
    model, _ = build()
    with pytest.raises(tost.StateError, match=r"(?s)DataParallel wraps a prepared Net.*Hint: pass the prepared model"):
        call(nn.DataParallel(model))


def test_fsdp2_matches_one_process_and_finalizes(tmp_path, reference) -> None:
    """fully_shard on the model, or on each module the rewritten graph calls; then finalize."""
    results = run_processes("fsdp2", tmp_path)
    assert_no_crash(results)
    for result in results:
        for layout in ("root", "called_modules"):
            run = result[layout]
            assert run["steps"] == reference["steps"] and run["active"] == reference["active"], layout
            for key, value in reference["state"].items():
                if is_statistic(key):
                    continue  # FSDP2 does not synchronize buffers: each rank keeps its own statistics
                torch.testing.assert_close(run["state"][key], value, rtol=0, atol=ATOL, msg=f"{layout} {key}")
            assert run["effective_zero"], layout
            scale = run["prepared_out"].abs().max()
            assert (run["finalized_out"] - run["prepared_out"]).abs().max() <= 1e-6 * scale, layout


def test_fsdp2_on_a_traced_through_block_needs_leaf_modules(tmp_path) -> None:
    """fully_shard's hooks on a block fx traced through never fire (the graph calls its children)."""
    results = run_processes("fsdp2_traced_through_block", tmp_path)
    assert_no_crash(results)
    for result in results:
        assert result["leaf_blocks"] is None
        assert result["traced_blocks"] is not None and "DTensor" in result["traced_blocks"]


def test_train_ddp_example_under_torchrun(tmp_path) -> None:
    """The example as a user launches it: torchrun, two CPU processes, rewrapped at retirement."""
    out = tmp_path / "sparse.pt"
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}", "--master-addr=127.0.0.1",
               f"--master-port={_free_port()}", str(EXAMPLE), "--steps", "8", "--batch", "8", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if "lo" in {name for _, name in socket.if_nameindex()}:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=EXAMPLE.parents[1], start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and the workers it started
        output, _ = process.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-5000:]
    assert "processes 2  replicas identical: yes  masked weights exactly zero: yes" in output, output[-3000:]
    spec = importlib.util.spec_from_file_location("train_ddp", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.SmallCNN().load_state_dict(torch.load(out), strict=True)
