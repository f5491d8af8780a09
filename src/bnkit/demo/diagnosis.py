"""The demo's diagnosis story: a healthy model, the same model broken the way people break it, the repair.

1. :func:`bnkit.diagnose` on the trained bnkit twin and the held-out digits: every layer ok.
2. Break a copy the way it happens in practice: a few more training steps on a stream that
   arrives sorted by label (its last batches hold only 7s, 8s and 9s) with ``momentum=0.9``, the
   Keras/d2l convention typed into torch, where it means 90% weight on the *new* batch. The
   running statistics now describe those three digits; held-out accuracy drops.
3. :func:`bnkit.diagnose` names the layers whose running statistics went stale, with the
   advice; :func:`bnkit.recalibrate` on the training digits repairs them; a last diagnosis
   and the held-out accuracy show the repair.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import bnkit
from bnkit.demo.data import Digits
from bnkit.demo.train import accuracy

__all__ = ["BREAK_MOMENTUM", "BREAK_STEPS", "DiagnosisStory", "break_model", "diagnosis_story"]

BREAK_MOMENTUM = 0.9  # the Keras/d2l "keep 90% of the old statistics", typed into torch
BREAK_STEPS = 5
BREAK_LR_FACTOR = 0.02  # small steps: the damage is in the statistics, not in the weights


@dataclass
class DiagnosisStory:
    """The numbers of the story (``asdict`` gives its JSON); diagnoses as :meth:`Diagnosis.to_dict`."""

    trained: dict
    broken: dict
    repaired: dict
    broken_layers: list[str]  # the layers the broken model's diagnosis does not call ok
    accuracy_trained: float  # held-out accuracy, eval mode
    accuracy_broken: float
    accuracy_repaired: float  # after bnkit.recalibrate on the training digits
    break_steps: int
    break_momentum: float
    break_lr: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _batches(x: Tensor, batch_size: int) -> list[Tensor]:
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


def break_model(model: nn.Module, data: Digits, batch_size: int, lr: float, steps: int = BREAK_STEPS,
                momentum: float = BREAK_MOMENTUM) -> nn.Module:
    """A copy of ``model`` trained ``steps`` more SGD steps on the end of a label-sorted stream, in eval mode.

    Every batch-norm layer of the copy keeps ``momentum`` (a user's setting the diagnosis
    should point at).
    """
    broken = copy.deepcopy(model)
    for m in broken.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
    order = torch.argsort(data.y_train, stable=True)
    x, y = data.x_train[order][-steps * batch_size:], data.y_train[order][-steps * batch_size:]
    opt = torch.optim.SGD(broken.parameters(), lr=lr)
    broken.train()
    for i in range(steps):
        batch = slice(i * batch_size, (i + 1) * batch_size)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(broken(x[batch]), y[batch]).backward()
        opt.step()
    return broken.eval()


def diagnosis_story(model: nn.Module, data: Digits, batch_size: int, lr: float,
                    plot: Path | None = None) -> DiagnosisStory:
    """Diagnose ``model`` (left unchanged), break a copy, diagnose it, recalibrate it, diagnose again.

    ``plot``: where to write the broken model's :meth:`bnkit.utils.diagnose.Diagnosis.plot`.
    """
    start = time.perf_counter()
    held_out = _batches(data.x_test, batch_size)
    trained = bnkit.diagnose(model, held_out, progress=False)
    break_lr = lr * BREAK_LR_FACTOR
    broken_model = break_model(model, data, batch_size, break_lr)
    accuracy_broken = accuracy(broken_model, data.x_test, data.y_test, 256)
    broken = bnkit.diagnose(broken_model, held_out, progress=False)
    if plot is not None:
        broken.plot(plot)
    bnkit.recalibrate(broken_model, _batches(data.x_train, batch_size), progress=False)
    repaired = bnkit.diagnose(broken_model, held_out, progress=False)
    return DiagnosisStory(
        trained=trained.to_dict(), broken=broken.to_dict(), repaired=repaired.to_dict(),
        broken_layers=[layer.name for layer in broken.layers if layer.verdict != "ok"],
        accuracy_trained=accuracy(model, data.x_test, data.y_test, 256),
        accuracy_broken=accuracy_broken,
        accuracy_repaired=accuracy(broken_model, data.x_test, data.y_test, 256),
        break_steps=BREAK_STEPS, break_momentum=BREAK_MOMENTUM, break_lr=break_lr,
        seconds=time.perf_counter() - start,
    )
