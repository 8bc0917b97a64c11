"""Deploy: sparse models that are smaller and faster than dense on the CPU.

- :func:`accelerate`: an inference copy whose convs and Linears run sparse kernels where
  they measured faster, BatchNorms folded, checked against the model; :func:`report` reads
  its per-layer decisions back.
- :func:`save` / :func:`load`: a compressed checkpoint, read back as the exact dense state_dict.

Example:
    >>> from tost_surgery import deploy
    >>> fast = deploy.accelerate(model, torch.randn(1, 3, 224, 224))
    >>> print(deploy.report(fast))
    >>> deploy.save(model, "model.tost.pt"); model.load_state_dict(deploy.load("model.tost.pt"))
"""

from ._accelerate import accelerate
from ._checkpoint import is_checkpoint, load, save
from ._decide import Choice, choose
from ._report import DeployReport, LayerDecision, report
from ._summary import DeploySummary, checkpoint_bytes
from ._timing import PairedTimer, Timer, Timing

__all__ = [
    "Choice",
    "DeployReport",
    "DeploySummary",
    "LayerDecision",
    "PairedTimer",
    "Timer",
    "Timing",
    "accelerate",
    "checkpoint_bytes",
    "choose",
    "is_checkpoint",
    "load",
    "report",
    "save",
]
