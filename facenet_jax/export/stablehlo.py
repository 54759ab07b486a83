"""StableHLO: ``jax.export`` serialisation of the inference network, batch dimension symbolic.

    exported = jax.export.export(jax.jit(f), platforms=PLATFORMS)(images: [batch, S, S, C] f32)
    artefact = exported.serialize()              # bytes: StableHLO + avals + platforms
    f(x)     = jax.export.deserialize(artefact).call(x)

The weights are constants of the module, so reloading needs JAX alone, not this project's model
code. ``batch`` is a symbolic dimension: one artefact serves every batch size (each size is
compiled on first use). Serialisation needs ``flatbuffers`` (the export extra). The module is
lowered for CPU, CUDA and TPU; ``Exported.call`` picks the platform it runs on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from facenet_jax.export.deps import require

PLATFORMS = ("cpu", "cuda", "tpu")
REQUIRES = ("flatbuffers",)  # Modules export() and load() import (the export extra).


def export(fn: Callable, image_shape: tuple[int, int, int], out: str) -> dict[str, Any]:
    """Serialises ``fn``: images [batch, H, W, C] float32 -> [batch, d] float32, to ``out``.

    Returns:
      what the contract records about the route (platforms, calling convention version).
    """
    require("flatbuffers", "--format=stablehlo")  # jax.export's serialisation format.
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    exported = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(spec)
    with open(out, "wb") as f:
        f.write(exported.serialize())
    return {
        "route": "jax.export (StableHLO), symbolic batch",
        "platforms": list(exported.platforms),
        "calling_convention_version": int(exported.calling_convention_version),
    }


def load(path: str) -> Callable[[np.ndarray], np.ndarray]:
    """The artefact as a function images [n, H, W, C] float32 -> [n, d] float32 (JAX only)."""
    require("flatbuffers", "a StableHLO model")
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    call = jax.jit(exported.call)
    return lambda images: np.asarray(call(jnp.asarray(images, jnp.float32)), np.float32)
