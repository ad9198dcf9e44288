"""Framework-free functional core: pure, jit-safe parametrization math.

Every function takes arrays in torch's layout (a Linear weight is ``(out, in)``)
and torch's argument meanings (``dim`` is torch's ``dim``). State is explicit:
functions take it in and return it. No flax, no torch.
"""

from jaxparam.functional._orthogonal import (
    default_orthogonal_map,
    forward_mode_ad,
    is_orthogonal,
    matrix_exp,
    orthogonal,
    orthogonal_right_inverse,
)
from jaxparam.functional._spectral_norm import (
    SpectralNormState,
    spectral_norm,
    spectral_norm_init,
)
from jaxparam.functional._weight_norm import weight_norm, weight_norm_inverse

__all__ = [
    "default_orthogonal_map",
    "forward_mode_ad",
    "is_orthogonal",
    "matrix_exp",
    "orthogonal",
    "orthogonal_right_inverse",
    "SpectralNormState",
    "spectral_norm",
    "spectral_norm_init",
    "weight_norm",
    "weight_norm_inverse",
]
