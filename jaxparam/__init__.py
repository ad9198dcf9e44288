"""jaxparam: PyTorch's parametrizations for JAX and Flax.

The mechanism lives in :mod:`jaxparam.parametrize` (torch's names:
``register_parametrization``, ``remove_parametrizations``, ``cached``, ...), the
built-ins in :mod:`jaxparam.parametrizations`, their pure math in
:mod:`jaxparam.functional`; linen and checkpoint conversion in
:mod:`jaxparam.linen` and :mod:`jaxparam.interop` (imported on demand).
"""

from jaxparam import functional, parametrizations, parametrize
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
    "functional",
    "parametrizations",
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
