"""GPU training kernels for LISA fine-tuning.

Importing this package touches no GPU and compiles nothing: Triton kernels compile at their first launch and the
C++ extension builds at first use.
"""

from .adamw import adamw_reference, fused_adamw_
from .host_arena import HostTensors
from .host_state_bank import HostStateBank
from .linear_cross_entropy import causal_lm_cross_entropy, linear_cross_entropy, linear_cross_entropy_reference
from .optimizer import FusedAdamW
from .state_parking import ParkedState, StateParker
from .step_in_backward import StepInBackward

__all__ = [
    "FusedAdamW",
    "HostStateBank",
    "HostTensors",
    "ParkedState",
    "StateParker",
    "StepInBackward",
    "adamw_reference",
    "causal_lm_cross_entropy",
    "fused_adamw_",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
]
