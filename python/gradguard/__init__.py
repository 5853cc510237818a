"""gradguard: per-layer gradient leakage measured while training runs, and releases protected by
policy, for PyTorch loops (``gradguard.wrap``) and Flower clients (``gradguard.fl``).

The native module links the libtorch of the ``torch`` it was built against (2.11): tensors cross
without a copy and the autograd graph of a Python forward is differentiated by the same engine.
Any other torch would be another C++ library in the same process, so the version is checked
here, before the native module is loaded.
"""

from __future__ import annotations

import torch as _torch

TORCH_VERSION = "2.11"
"""The torch release (major.minor) this package is built for."""

if not _torch.__version__.split("+")[0].startswith(TORCH_VERSION + "."):
    raise ImportError(
        f"gradguard is built for torch {TORCH_VERSION}.x, but torch {_torch.__version__} is installed: "
        f"install torch=={TORCH_VERSION}.0 (pip install 'torch=={TORCH_VERSION}.0') or rebuild gradguard against this torch"
    )

from . import _native  # noqa: E402  (after the version check, on purpose)
from ._native import (  # noqa: E402
    AuditError,
    ConfigError,
    DataError,
    GradguardError,
    InputError,
    InternalError,
    ModelError,
    ParameterError,
    PolicyError,
    StateError,
)
from ._torch import Guard, Release, Vetting, wrap  # noqa: E402

__version__ = _native.__version__

__all__ = [
    "AuditError",
    "ConfigError",
    "DataError",
    "GradguardError",
    "Guard",
    "InputError",
    "InternalError",
    "ModelError",
    "ParameterError",
    "PolicyError",
    "Release",
    "StateError",
    "TORCH_VERSION",
    "Vetting",
    "wrap",
]
