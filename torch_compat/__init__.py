"""torch_compat: torch's ``parametrize`` API, running JAX parametrizations on torch modules.

Example:
    >>> import torch
    >>> import torch_compat.parametrize as P
    >>> m = P.register_parametrization(torch.nn.Linear(2, 2), "weight", lambda x: x + x.T)
    >>> torch.equal(m.weight, m.weight.T)
    True
"""

from torch_compat import parametrizations, parametrize
from torch_compat._bridge import JaxParametrization, NNXParametrization, to_jax, to_torch

__all__ = [
    "JaxParametrization",
    "NNXParametrization",
    "parametrizations",
    "parametrize",
    "to_jax",
    "to_torch",
]
