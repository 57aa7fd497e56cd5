"""Invertible layers and the multi-scale Glow: pure bijections, no knowledge and no I/O.

``Glow(GlowConfig(...))`` maps float images in ``[0, 1)`` to standardised residuals ``r`` (one
tensor per level, the top level last) with the log absolute determinant of its Jacobian,
``ladj``: ``log p_0(x) = log N(r; 0, I) + ladj``. See ``docs/architecture.md``, "Flow".
"""

from tzkcli.flows import kernels
from tzkcli.flows.config import COUPLINGS, GlowConfig
from tzkcli.flows.glow import Glow
from tzkcli.flows.layers import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    FlowStep,
    InvConv1x1,
    Split,
    Squeeze,
    Standardize,
)

__all__ = [
    "COUPLINGS",
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "FlowStep",
    "Glow",
    "GlowConfig",
    "InvConv1x1",
    "Split",
    "Squeeze",
    "Standardize",
    "kernels",
]
