"""Checks that re-parameterization preserves a model's eval output, block by block and end to end."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .modules import MobileOneBlock
from .options import module_path
from .reparameterize import reparameterize_model


@dataclass(frozen=True)
class ErrorStat:
    """Max absolute and relative (to the largest reference magnitude) error of one output."""

    name: str
    max_abs: float
    max_rel: float


NOTHING_CHECKED = (
    "nothing was checked: the model has no unfused module with a reparameterize() method "
    "(already re-parameterized? verify the model before fusing it)"
)


@dataclass(frozen=True)
class ReparamReport:
    """The per-block and end-to-end errors of a fused model against its unfused eval output.

    ``checked`` is False when the model had nothing to fuse (e.g. it was already re-parameterized):
    then every error is zero because both sides ran the same modules, and nothing was verified.
    """

    blocks: list[ErrorStat] = field(default_factory=list)
    end_to_end: ErrorStat = ErrorStat("model", 0.0, 0.0)
    checked: bool = True

    @property
    def max_rel(self) -> float:
        """The largest relative error over every block and the whole model."""
        return max([self.end_to_end.max_rel, *(b.max_rel for b in self.blocks)])

    def __str__(self) -> str:
        rows = [f"{'output':<40} {'max abs':>10} {'max rel':>10}"]
        for stat in [*self.blocks, self.end_to_end]:
            rows.append(f"{stat.name:<40} {stat.max_abs:>10.3e} {stat.max_rel:>10.3e}")
        if not self.checked:
            rows.append(NOTHING_CHECKED)
        return "\n".join(rows)


def _flatten(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _flatten(item)]
    return []


def _error(name: str, got, want) -> ErrorStat:
    pairs = list(zip(_flatten(got), _flatten(want)))
    max_abs = max((float((g.double() - w.double()).abs().max()) for g, w in pairs if w.numel()), default=0.0)
    scale = max((float(w.double().abs().max()) for _, w in pairs if w.numel()), default=0.0)
    return ErrorStat(name, max_abs, max_abs / scale if scale > 0 else max_abs)


def _capture_blocks(model: nn.Module, example_input) -> tuple[object, dict]:
    captured: dict = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, MobileOneBlock) and not module.inference_mode:

            def hook(_module, args, output, name=name):
                captured[name] = (args[0], output)

            handles.append(module.register_forward_hook(hook))
    try:
        reference = model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return reference, captured


def _has_unfused(model: nn.Module) -> bool:
    """Whether any module would change under ``reparameterize()`` (ours: not yet in inference mode)."""
    return any(
        hasattr(m, "reparameterize") and not getattr(m, "inference_mode", False) for m in model.modules()
    )


def verify_reparameterization(model: nn.Module, example_input) -> ReparamReport:
    """Compares ``reparameterize_model(model)`` with ``model`` in eval mode, without changing it.

    The reference runs every branch module by module (the reference's path, see :func:`module_path`).
    Each unfused MobileOne block is compared with its fused copy on the input it saw, and the whole
    model on ``example_input``. ``model``'s train/eval flags and statistics are left as they were.
    A model with nothing to fuse (already re-parameterized) gives a report with ``checked=False``
    and a ``UserWarning``: its zero errors compare the model with itself.

    Returns:
        A :class:`ReparamReport` with max absolute and relative errors.
    """
    checked = _has_unfused(model)
    if not checked:
        warnings.warn(f"verify_reparameterization: {NOTHING_CHECKED}", UserWarning, stacklevel=2)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            with module_path():
                reference, captured = _capture_blocks(model, example_input)
            fused = reparameterize_model(model)
            fused_modules = dict(fused.named_modules())
            blocks = [_error(name, fused_modules[name](x), y) for name, (x, y) in captured.items()]
            end_to_end = _error("model", fused(example_input), reference)
    finally:
        for module, mode in modes:
            module.training = mode
    return ReparamReport(blocks, end_to_end, checked)
