"""torch.compile trains a prepared model (one graph per set of active techniques, no graph break);
the finalized model, and a prepared one, export with torch.export; ONNX matches onnxruntime.

CPU inductor takes minutes to compile even a tiny model on a shared machine, so the per-step
checks use the ``aot_eager`` backend (dynamo and AOTAutograd, the parts that see our graph);
one inductor run is marked ``slow``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tost_surgery as tost
from tost_surgery import Recipe

from .conftest import TinyNet, bernoulli_mask

STEPS = 6
RECIPE = dict(total_steps=STEPS, warmup=0.5)
"""Every technique retires after 3 of the 6 steps."""


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(50 + step)
    return torch.randn(4, 3, 16, 16, generator=generator), torch.randint(0, 10, (4,), generator=generator)


def prepared() -> tuple[TinyNet, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = TinyNet()
    mask = bernoulli_mask(model)
    tost.prepare(model, mask, Recipe.tost(**RECIPE))
    return model, mask


def train(model: nn.Module, forward: nn.Module, steps: int = STEPS) -> list[float]:
    """``steps`` bound optimizer steps of ``forward`` (the model or a compiled wrapper of it)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    tost.bind(model, optimizer)
    losses = []
    for step in range(steps):
        x, y = batch(step)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(x), y, label_smoothing=tost.label_smoothing(forward))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_masked_zero(model: nn.Module, mask: dict[str, torch.Tensor]) -> None:
    for name, m in mask.items():
        assert (model.get_submodule(name.rsplit(".", 1)[0]).weight.detach()[~m] == 0).all(), name


@pytest.fixture
def dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def test_compiled_training_compiles_once_per_graph_without_breaks(dynamo) -> None:
    """Forward and backward through AOTAutograd: one graph for the warm-up, one after retirement."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model, mask = prepared()
    eager = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    losses = train(model, compiled)
    assert counter.frame_count == 2  # warm-up graph, then the retired graph
    assert not dynamo["graph_break"], dict(dynamo["graph_break"])
    expected = train(eager, eager)
    assert losses == pytest.approx(expected, abs=1e-5)
    for (name, value), reference in zip(model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(value, reference, atol=1e-5, rtol=0, msg=name)
    assert_masked_zero(model, mask)
    model.eval()
    compiled(batch(0)[0])  # eval is its own graph (fx bakes the mode in): one more compile, no break
    assert counter.frame_count == 3 and not dynamo["graph_break"]


@pytest.mark.slow
def test_inductor_training_matches_eager(dynamo) -> None:
    """The default backend, through retirement (about a minute of compiling on a quiet CPU)."""
    model, mask = prepared()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model)
    losses = train(model, compiled)
    assert losses == pytest.approx(train(eager, eager), abs=1e-4)
    assert not dynamo["graph_break"], dict(dynamo["graph_break"])
    assert dynamo["stats"]["unique_graphs"] == 2
    assert_masked_zero(model, mask)
    tost.finalize(model)
    fresh = TinyNet()
    fresh.load_state_dict(model.state_dict(), strict=True)


def finalized() -> tuple[TinyNet, dict[str, torch.Tensor]]:
    model, mask = prepared()
    train(model, model)
    tost.finalize(model)
    return model.eval(), mask


def test_finalized_model_exports_with_dynamic_batch() -> None:
    model, mask = finalized()
    x = batch(0)[0]
    batch_dim = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch_dim}})
    for size in (4, 7):
        x = torch.randn(size, 3, 16, 16)
        torch.testing.assert_close(exported.module()(x), model(x), rtol=0, atol=1e-6)
    state = exported.state_dict
    for name, m in mask.items():
        assert (state[name][~m] == 0).all(), name
    assert not any(name.startswith("tost") or "parametrizations" in name for name in state)


def test_prepared_model_exports_mid_warmup() -> None:
    """Ghost neurons and skips are plain ops in the graph: a prepared model exports as it is."""
    model, _ = prepared()
    tost.step(model, 1)
    model.eval()
    x = batch(0)[0]
    exported = torch.export.export(model, (x,))
    targets = {str(node.target) for node in exported.graph.nodes}
    assert any("lerp" in t for t in targets) and any("addcmul" in t for t in targets)
    torch.testing.assert_close(exported.module()(x), model(x), rtol=0, atol=1e-6)


def test_onnx_export_matches_onnxruntime(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    model, mask = finalized()
    x = batch(0)[0]
    batch_dim = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes={"x": {0: batch_dim}}, verbose=False)
    path = tmp_path / "tiny.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    for size in (4, 7):
        x = torch.randn(size, 3, 16, 16, generator=torch.Generator().manual_seed(size))
        (out,) = session.run(None, {name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), rtol=1e-5, atol=1e-5)
    graph = onnx.load(str(path)).graph
    initializers = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    for layer, m in mask.items():  # the masked zeros survive into the ONNX file
        if layer in initializers:
            assert (initializers[layer][~m] == 0).all(), layer
    assert any(layer in initializers for layer in mask)
