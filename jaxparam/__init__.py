"""jaxparam: PyTorch's parametrizations for JAX and Flax.

The mechanism lives in :mod:`jaxparam.parametrize` (torch's names:
``register_parametrization``, ``remove_parametrizations``, ``cached``, ...).
"""

from jaxparam import parametrize
from jaxparam._value import ParametrizedValue
from jaxparam.parametrize import (
    ParametrizationList,
    cached,
    is_parametrized,
    register_parametrization,
    remove_parametrizations,
    transfer_parametrizations_and_params,
    type_before_parametrizations,
)

__all__ = [
    "parametrize",
    "ParametrizedValue",
    "ParametrizationList",
    "cached",
    "is_parametrized",
    "register_parametrization",
    "remove_parametrizations",
    "transfer_parametrizations_and_params",
    "type_before_parametrizations",
]
