"""Figures reported by the SSBNet paper's supplementary (Tables 1-3), at 224 x 224.

These are the acceptance targets of :mod:`timm_ssb`: our models must reproduce them (GMACs within
1%, parameters within the paper's rounding to 0.1M). The paper calls GMACs "FLOPS".
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

__all__ = ['PaperFigure', 'PAPER_COMPLEXITY', 'PARAMS_ROUNDING_M', 'GMACS_RTOL', 'paper_figure']

PARAMS_ROUNDING_M = 0.05
"""Half of the 0.1M step to which the paper rounds parameter counts."""

GMACS_RTOL = 0.01
"""Relative tolerance on GMACs."""


@dataclass(frozen=True)
class PaperFigure:
    """One model configuration of the paper with its reported complexity."""

    model: str
    gmacs: float
    params_m: float
    sampler: Optional[str] = None
    sizes: Optional[Tuple[int, int, int]] = None

    def model_kwargs(self) -> Dict[str, Any]:
        """``timm.create_model`` keyword arguments of this configuration."""
        kwargs: Dict[str, Any] = {}
        if self.sampler is not None:
            kwargs['ssb_sampler'] = self.sampler
        if self.sizes is not None:
            kwargs['ssb_sizes'] = self.sizes
        return kwargs

    @property
    def label(self) -> str:
        parts = [self.model]
        if self.sampler is not None:
            parts.append(self.sampler)
        if self.sizes is not None:
            parts.append(str(self.sizes))
        return ' '.join(parts)


def _rows(sampler: str, sizes: Optional[Tuple[int, int, int]], gmacs: Tuple[float, ...], params: Tuple[float, ...]):
    names = ('ssb_resnetd50', 'ssb_resnetd101', 'ssb_resnetd152')
    return tuple(PaperFigure(n, g, p, sampler, sizes) for n, g, p in zip(names, gmacs, params, strict=True))


PAPER_COMPLEXITY: Tuple[PaperFigure, ...] = (
    PaperFigure('resnet50d', 4.3, 25.6),
    *_rows('adaptive', (12, 6, 3), (2.61, 3.35, 4.14), (25.6, 44.6, 60.3)),
    *_rows('uniform', (12, 6, 3), (2.61, 3.35, 4.13), (25.6, 44.6, 60.2)),
    *_rows('adaptive', (16, 8, 4), (2.95, 4.25, 5.61), (25.6, 44.6, 60.3)),
    *_rows('uniform', (16, 8, 4), (2.95, 4.25, 5.60), (25.6, 44.6, 60.2)),
    *_rows('bilinear', (16, 8, 4), (2.95, 4.25, 5.61), (25.6, 44.6, 60.2)),
    *_rows('adaptive', (20, 10, 5), (3.38, 5.40, 7.49), (25.6, 44.6, 60.3)),
    *_rows('uniform', (20, 10, 5), (3.38, 5.40, 7.49), (25.6, 44.6, 60.2)),
    *_rows('dconv', None, (2.74, 3.69, 4.65), (25.9, 45.3, 61.4)),
)
"""Every complexity figure of the supplementary; ``dconv`` rows are its (14, 7, 4) configuration."""


def paper_figure(
    model: str,
    sampler: Optional[str] = None,
    sizes: Optional[Tuple[int, ...]] = None,
) -> Optional[PaperFigure]:
    """The paper's figure for ``model`` with exactly this sampler and sizes (``None`` for a baseline
    or for ``dconv``'s sizes), or ``None`` if the paper reports none."""
    sizes = tuple(sizes) if sizes is not None else None
    for row in PAPER_COMPLEXITY:
        if (row.model, row.sampler, row.sizes) == (model, sampler, sizes):
            return row
    return None
