"""deploy.accelerate: BatchNorm folding, the dense/sparse decision, verification and refusal.

Timings are injected (a Timer that reports fixed numbers): no test depends on a measured time.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tost_surgery as tost
from tost_surgery import StateError, TostSurgeryError, TostSurgeryWarning, deploy
from tost_surgery.deploy import Timing, choose
from tost_surgery.deploy._fold import fold_batchnorms
from tost_surgery.deploy._verify import mismatch
from tost_surgery.deploy.kernels import ChannelsLast, CsrConv, CsrLinear

from .conftest import TinyNet, bernoulli_mask, masked_reference


def timer_with(speedups: dict[str, float]):
    """A Timer that runs each candidate once and reports it ``speedups[kernel]`` times faster than dense."""
    calls = []

    def timer(layer, candidates):
        for fn in candidates.values():
            fn()
        calls.append((layer, sorted(candidates)))
        return Timing.of(dense=1e-3, **{k: 1e-3 / speedups.get(k, 0.5) for k in candidates if k != "dense"})

    timer.calls = calls
    return timer


class Net(nn.Module):
    """Conv-BN-ReLU, a strided conv, max pooling, a Conv1d over rows, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16, affine=False)
        self.pool = nn.MaxPool2d(2)
        self.line = nn.Conv1d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        x = self.line(x.flatten(2))
        return self.fc(x.mean(-1))


def pruned(model: nn.Module, density: float = 0.3) -> nn.Module:
    """The model with a random mask applied by zeroing, and BatchNorm statistics that are not trivial."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            if module.affine:
                nn.init.uniform_(module.weight, 0.5, 1.5)
                nn.init.uniform_(module.bias, -0.2, 0.2)
    return masked_reference(model, bernoulli_mask(model, density)).eval()


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return pruned(Net())


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))


def test_accelerate_matches_the_model_and_leaves_it_as_it_was(net: Net, x: torch.Tensor) -> None:
    net.train()
    before = copy.deepcopy(net.state_dict())
    fast = deploy.accelerate(net, x, timer=timer_with({"csr": 3.0, "channels_last": 1.0}))
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert isinstance(fast, Net) and not fast.training and fast is not net
    assert isinstance(fast.conv1, CsrConv) and isinstance(fast.conv2, CsrConv)
    assert isinstance(fast.line, CsrConv) and isinstance(fast.fc, CsrLinear)
    assert isinstance(fast.bn1, nn.Identity) and isinstance(fast.bn2, nn.Identity)
    with torch.no_grad():
        reference = net.eval()(x)
        for probe in (x, torch.randn(2, 3, 12, 12)):
            assert (fast(probe) - net(probe)).abs().max() <= 1e-5 * net(probe).abs().max()
    assert fast(x).argmax(1).tolist() == reference.argmax(1).tolist()


def test_each_layer_keeps_dense_unless_sparse_wins_by_min_speedup(net: Net, x: torch.Tensor) -> None:
    timer = timer_with({"csr": 1.05, "channels_last": 0.9})
    fast = deploy.accelerate(net, x, min_speedup=1.1, timer=timer)
    assert isinstance(fast.conv1, nn.Conv2d) and isinstance(fast.fc, nn.Linear) and isinstance(fast.pool, nn.MaxPool2d)
    rows = {row.name: row for row in deploy.report(fast).rows}
    assert rows["conv1"].kernel == "dense" and rows["conv1"].reason == "csr 1.05x < min_speedup 1.1x"
    assert rows["pool"].reason == "dense faster (channels_last 0.90x)"
    assert rows["conv1"].folded == "bn1" and rows["conv1"].speedup == pytest.approx(1.05)
    # The same timings pass a lower bar: every conv/Linear runs CSR.
    fast = deploy.accelerate(net, x, min_speedup=1.04, timer=timer_with({"csr": 1.05, "channels_last": 0.9}))
    assert {row.name: row.kernel for row in deploy.report(fast).rows} == {
        "conv1": "csr", "conv2": "csr", "pool": "dense", "line": "csr", "fc": "csr",
    }  # fmt: skip


def test_the_fastest_candidate_wins(net: Net, x: torch.Tensor) -> None:
    fast = deploy.accelerate(net, x, timer=timer_with({"csr": 1.5, "channels_last": 2.0}))
    assert isinstance(fast.conv1, ChannelsLast) and isinstance(fast.conv1.layer, nn.Conv2d)
    assert isinstance(fast.pool, ChannelsLast) and isinstance(fast.line, CsrConv)  # Conv1d: no layout candidate
    assert deploy.report(fast).rows[0].kernel == "channels_last"


def test_choose_takes_the_best_candidate_only_past_min_speedup() -> None:
    assert choose(Timing.of(dense=2.0, csr=1.0, channels_last=1.5), 1.1).kernel == "csr"
    assert choose(Timing.of(dense=1.0, csr=0.91), 1.1).kernel == "dense"
    assert choose(Timing.of(dense=1.0, csr=0.91), 1.09).kernel == "csr"
    assert choose(Timing.of(dense=1.0), 1.1).reason == "no sparse candidate"


def test_dense_layers_are_not_timed_past_the_density_cap(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    net = pruned(Net(), density=0.9)
    timer = timer_with({"csr": 9.0})
    fast = deploy.accelerate(net, x, timer=timer)
    rows = {row.name: row for row in deploy.report(fast).rows}
    assert rows["fc"].kernel == "dense" and rows["fc"].dense_ms is None
    assert rows["fc"].reason == "density > 50%: no sparse timing"
    assert ("conv1", ["channels_last", "dense"]) in timer.calls  # the layout is still a candidate


def test_report_is_plain_data_and_a_table(net: Net, x: torch.Tensor) -> None:
    fast = deploy.accelerate(net, x, timer=timer_with({"csr": 2.0, "accelerated": 2.0}))
    report = deploy.report(fast)
    data = report.to_dict()
    assert [row["name"] for row in data["rows"]] == ["conv1", "conv2", "pool", "line", "fc"]
    assert data["speedup"] == pytest.approx(2.0) and data["threads"] == torch.get_num_threads()
    conv1 = data["rows"][0]
    assert conv1["density"] == pytest.approx(float((net.conv1.weight != 0).float().mean()))
    assert conv1["macs"] == 2 * 12 * 12 * net.conv1.weight.numel()
    assert data["rows"][2]["density"] is None and data["rows"][2]["macs"] == 0
    nonzero = sum(r["macs"] * r["density"] for r in data["rows"] if r["density"] is not None)
    assert data["mac_ratio"] == pytest.approx(sum(r["macs"] for r in data["rows"]) / nonzero)
    text = str(report)
    assert "conv1" in text and "+ bn1" in text and "end to end 2.00x" in text
    # tost.report of the copy is the same report: its CSR layers hold no weight parameter to count
    assert tost.report(fast) is report and tost.report(net).to_dict()["rows"][0]["name"] == "conv1.weight"


def test_threads_are_set_for_the_decision_and_restored(net: Net, x: torch.Tensor) -> None:
    before = torch.get_num_threads()
    seen = []

    def timer(layer, candidates):
        seen.append(torch.get_num_threads())
        return Timing.of(dense=1.0, **{k: 2.0 for k in candidates if k != "dense"})

    fast = deploy.accelerate(net, x, threads=2, timer=timer)
    assert set(seen) == {2} and torch.get_num_threads() == before and deploy.report(fast).threads == 2


def test_a_kernel_that_disagrees_with_dense_is_refused(
    net: Net, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tost_surgery.deploy.kernels import csr_conv

    right = csr_conv.conv2d
    monkeypatch.setattr(csr_conv, "conv2d", lambda *args: right(*args) * 1.001)
    with pytest.raises(TostSurgeryError, match=r"Kernel 'csr' for layer 'conv1' \(Conv2d 3x3\) does not match"):
        deploy.accelerate(net, x, timer=timer_with({"csr": 3.0}))


def test_a_model_that_ends_up_different_is_refused(net: Net, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    from tost_surgery.deploy import _accelerate, _fold

    def bad_fold(model):
        folded = _fold.fold_batchnorms(model)
        with torch.no_grad():
            model.conv2.bias.add_(0.01)  # a folding bug: the model no longer computes the same thing
        return folded

    monkeypatch.setattr(_accelerate, "fold_batchnorms", bad_fold)
    with pytest.raises(TostSurgeryError, match=r"(?s)on the example, does not match.*expected: max \|difference\|"):
        deploy.accelerate(net, x, timer=timer_with({"csr": 3.0}))


def test_without_mkl_sparse_support_it_warns_once_and_stays_dense(
    net: Net, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tost_surgery.deploy import kernels

    monkeypatch.setattr(kernels, "has_sparse_matmul", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = deploy.accelerate(net, x, timer=timer_with({"csr": 9.0, "channels_last": 0.5}))
    assert [str(w.message) for w in caught if issubclass(w.category, TostSurgeryWarning)] == [
        "deploy.accelerate: torch has no MKL sparse support (CSR x dense) in this build: every layer stays dense; "
        "the copy is dense."
    ]
    rows = deploy.report(fast).rows
    assert all(row.kernel == "dense" for row in rows)
    assert {r.name: r.reason for r in rows}["fc"] == "torch has no MKL sparse support here"
    with torch.no_grad():
        assert (fast(x) - net(x)).abs().max() <= 1e-5 * net(x).abs().max()


def test_fold_keeps_zeros_and_the_eval_output() -> None:
    torch.manual_seed(0)
    net = pruned(Net())
    folded = copy.deepcopy(net)
    assert fold_batchnorms(folded).pairs == (("conv1", "bn1"), ("conv2", "bn2"))
    assert torch.equal(folded.conv1.weight == 0, net.conv1.weight == 0)
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        assert (folded(x) - net(x)).abs().max() <= 1e-5 * net(x).abs().max()


def test_fold_leaves_a_conv_whose_output_is_also_read_elsewhere() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            z = self.bn2(self.conv2(self.bn(y) + y))
            return z + self.bn2(z)  # bn2 called twice: not folded either

    model = pruned(Shared())
    assert fold_batchnorms(model).pairs == ()


def test_fold_says_so_when_the_model_does_not_trace() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.bn(self.conv(x))
            return self.bn(self.conv(-x))

    model = Untraceable().eval()
    folded = fold_batchnorms(model)
    assert folded.pairs == () and "torch.fx could not trace the model" in folded.note
    fast = deploy.accelerate(model, torch.randn(1, 3, 8, 8), timer=timer_with({"csr": 2.0}))
    assert any("could not trace" in note for note in deploy.report(fast).notes)


def test_accelerate_takes_a_finalized_model() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    mask = bernoulli_mask(model, 0.2)
    tost.prepare(model, mask, tost.Recipe.baseline())
    with pytest.raises(StateError, match="(?s)is prepared.*Hint: model = tost_surgery.finalize"):
        deploy.accelerate(model, torch.randn(1, 3, 16, 16), timer=timer_with({}))
    tost.finalize(model)
    fast = deploy.accelerate(model, torch.randn(1, 3, 16, 16), timer=timer_with({"csr": 2.0}))
    assert isinstance(fast.conv2, CsrConv) and isinstance(fast.bn2, nn.Identity)


def test_a_layer_the_example_never_reaches_stays_dense(x: torch.Tensor) -> None:
    class Unused(Net):
        def __init__(self) -> None:
            super().__init__()
            self.spare = nn.Linear(4, 4)

    torch.manual_seed(0)
    fast = deploy.accelerate(pruned(Unused()), x, timer=timer_with({"csr": 2.0}))
    assert {r.name: r.reason for r in deploy.report(fast).rows}["spare"] == "not called on the example"


def test_mismatch_rules() -> None:
    ref = torch.tensor([[1.0, 0.5], [2.0, 2.0]])
    assert mismatch(ref, ref + 1e-6) is None
    assert "max |difference|" in mismatch(ref, ref + 1e-3).expected
    assert mismatch(ref, ref.clone().fill_(float("nan"))) is not None
    assert mismatch(ref, ref[:1]).expected == "Tensor (2, 2) torch.float32"
    assert mismatch({"a": ref}, {"b": ref}).where == "outputs"
    close = torch.tensor([[1.0, 1.0 + 1e-7], [3.0, 3.0]])
    swapped = torch.tensor([[1.0 + 1e-7, 1.0], [3.0, 3.0 + 1e-7]])
    assert mismatch(close, swapped).found == "1 rows differ"  # within the tolerance, but the argmax moved
    assert mismatch(close[1:], swapped[1:]) is None  # an exact tie has no argmax to keep
    assert mismatch((ref, torch.tensor([1, 2])), (ref, torch.tensor([1, 3]))).where == "output[1]"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(min_speedup=0), "min_speedup must be a number > 0"),
        (dict(min_speedup=True), "min_speedup must be a number > 0"),
        (dict(threads=0), "threads must be None or an int >= 1"),
        (dict(probes=-1), "probes must be an int >= 0"),
    ],
)
def test_accelerate_rejects_bad_arguments(net: Net, x: torch.Tensor, kwargs: dict, match: str) -> None:
    with pytest.raises(TostSurgeryError, match=match):
        deploy.accelerate(net, x, **kwargs)


@pytest.mark.parametrize("inputs", [None, [], (1.0,), "x"])
def test_accelerate_rejects_example_inputs_that_are_not_tensors(net: Net, inputs: object) -> None:
    with pytest.raises(TostSurgeryError, match="(?s)example_inputs as a tensor or a tuple.*Hint: accelerate"):
        deploy.accelerate(net, inputs)


def test_accelerate_rejects_what_is_not_a_module(x: torch.Tensor) -> None:
    with pytest.raises(TostSurgeryError, match="accelerate takes an nn.Module, found dict"):
        deploy.accelerate({}, x)


def test_report_of_a_model_accelerate_did_not_make() -> None:
    with pytest.raises(TostSurgeryError, match="(?s)was not made by deploy.accelerate.*Hint:"):
        deploy.report(nn.Linear(2, 2))


def test_the_default_timer_times_every_candidate_paired() -> None:
    linear = nn.Linear(64, 64)
    sparse = CsrLinear.from_linear(linear)
    v = torch.randn(4, 64)
    timing = deploy.PairedTimer(rounds=3, turn_seconds=1e-4)(
        "fc", {"dense": lambda: linear(v), "csr": lambda: sparse(v)}
    )
    assert set(timing.seconds) == {"dense", "csr"} and set(timing.speedup) == {"csr"}
    assert all(t > 0 for t in timing.seconds.values()) and timing.speedup["csr"] > 0


def test_accelerated_timm_style_model_with_real_timer_runs() -> None:
    torch.manual_seed(0)
    model = pruned(Net(), density=0.1)
    x = torch.randn(1, 3, 16, 16)
    fast = deploy.accelerate(model, x, timer=deploy.PairedTimer(rounds=2, turn_seconds=1e-4))
    report = deploy.report(fast)
    assert report.speedup > 0 and report.dense_ms > 0 and len(report.rows) == 5
    with torch.no_grad():
        assert (fast(x) - model(x)).abs().max() <= 1e-5 * model(x).abs().max()


def test_the_default_timer_stops_early_only_when_the_outcome_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    from tost_surgery.deploy import _timing

    clock = {"dense": 4.0, "csr": 1.0, "channels_last": 3.9}  # seconds per call, as the injected clock says
    monkeypatch.setattr(_timing, "_seconds", lambda fn, repeats: clock[fn()])
    rounds_run = []
    summarize = _timing._summarize
    monkeypatch.setattr(_timing, "_summarize", lambda times: rounds_run.append(len(times["csr"])) or summarize(times))
    timer = deploy.PairedTimer(rounds=9, min_rounds=3, clear=1.5)
    candidates = {name: (lambda name=name: name) for name in clock}
    timing = timer("conv", candidates)  # csr 4x and ahead of channels_last: clear after 3 rounds
    assert timing.speedup["csr"] == pytest.approx(4.0) and rounds_run[-1] == 3
    clock.update(csr=8.0, channels_last=9.0)  # both slower by more than 1.5x: dense, clearly
    assert timer("conv", candidates).speedup["csr"] == pytest.approx(0.5) and rounds_run[-1] == 3
    clock.update(csr=3.0, channels_last=8.0)  # 1.33x: a threshold near it decides, so every round runs
    assert timer("conv", candidates).speedup["csr"] == pytest.approx(4 / 3) and rounds_run[-1] == 9
    clock.update(csr=1.0, channels_last=1.0)  # two clear winners, neither ahead: every round runs
    assert timer("conv", candidates).speedup["csr"] == pytest.approx(4.0) and rounds_run[-1] == 9
