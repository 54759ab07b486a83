"""The optional ``export`` extra: import its packages, or fail naming the extra to install.

Nothing else in ``facenet_jax`` imports TensorFlow, ONNX or LiteRT; training and the default run
never need them. Every format module imports its runtime through ``require`` at call time.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA = 'pip install -e ".[export]"'


class MissingExtraError(ImportError):
    """An ``export`` dependency is not installed; the message says what to install."""


def require(module: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or MissingExtraError naming ``purpose`` and the extra.

    Args:
      module: a dotted module name, e.g. ``"onnxruntime"`` or ``"jax.experimental.jax2tf"``.
      purpose: what needed it, e.g. ``"--format=onnx"``, for the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{purpose} needs the optional package of {module!r}, which is not installed "
            f"({type(e).__name__}: {e}); install the export extra: {EXTRA}"
        ) from e


def versions(*distributions: str) -> dict[str, str]:
    """{distribution: installed version} of those installed (recorded in the contract)."""
    from importlib import metadata

    out = {}
    for name in distributions:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
