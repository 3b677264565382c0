"""Fine-tuning methods, one module each, behind the interface in base.py."""

from __future__ import annotations

from ..config import FullMethod, LoraMethod
from .base import Method, MethodError, cast_frozen_linears_, count_parameters, trainable_named_parameters
from .full import Full
from .lora import Lora

_REGISTRY = {LoraMethod: Lora, FullMethod: Full}


def build_method(cfg) -> Method:
    """The Method object for a method config section."""
    try:
        return _REGISTRY[type(cfg)](cfg)
    except KeyError:
        raise MethodError(f"no implementation for method config {type(cfg).__name__}") from None


__all__ = ["Method", "MethodError", "cast_frozen_linears_", "build_method", "count_parameters", "trainable_named_parameters"]
