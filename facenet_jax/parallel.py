"""Devices, processes and the 1-D data mesh (the pmap model written with ``jax.shard_map``).

One named axis, ``DATA_AXIS``, spans every device of every process. Parameters and optimiser state
are replicated on it, batches are split along it. Collectives (``pmean``, ``psum``,
``all_gather``) appear only inside the step functions, on this axis.

``PreemptionWatcher`` turns SIGTERM / SIGINT into a step at which every process stops together.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


AUTO = "auto"  # coordinator_address value: let JAX detect the cluster (TPU pod slices, ...).


def _launcher_in_environment() -> str | None:
    """The multi-process launcher this process was started by, if JAX can read it from env vars.

    SLURM (``srun``, several tasks), Open MPI (``mpirun``) and TPU slices on GKE set variables
    that ``jax.distributed.initialize()`` reads; a single plain process has none of them.
    """
    if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        return "TPU slice on GKE"
    return None


def initialize_distributed(
    coordinator_address: str = "", num_processes: int = 0, process_id: int = -1
) -> None:
    """Calls ``jax.distributed.initialize`` when this is one of several processes.

    In order: explicit arguments (flags); else the environment variables
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; else a launcher JAX
    detects from the environment (SLURM, Open MPI, TPU slices on GKE). ``coordinator_address=
    "auto"`` asks JAX to detect everything itself, which is how multi-host Cloud TPU VM slices
    (whose topology lives in the metadata server, not in env vars) are joined. A single plain
    process does nothing; a second call does nothing. On CPU, cross-process collectives use
    gloo (JAX's default ``jax_cpu_collectives_implementation``).
    """
    if jax.distributed.is_initialized():
        return
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
    if process_id < 0:
        process_id = int(os.environ.get("JAX_PROCESS_ID", "-1"))
    launcher = _launcher_in_environment()
    if coordinator_address == AUTO:
        jax.distributed.initialize()
    elif coordinator_address or num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=coordinator_address or None,
            num_processes=num_processes or None,
            process_id=process_id if process_id >= 0 else None,
        )
    elif launcher is not None:
        logging.info("multi-process launch detected (%s)", launcher)
        jax.distributed.initialize()
    logging.info(
        "JAX process %d/%d, %d local devices, %d global devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )


def create_mesh(devices: list[Any] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes) named DATA_AXIS."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_batch_size(global_batch_size: int, mesh: Mesh, field: str) -> int:
    """Returns the per-device batch size; raises naming ``field`` if it does not divide evenly."""
    n = mesh.devices.size
    if global_batch_size % n:
        raise ValueError(
            f"{field}: the global batch size {global_batch_size} must be divisible by the "
            f"device count {n}"
        )
    return global_batch_size // n


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of ``tree`` on every device of the mesh (fully replicated)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's local rows into global arrays split along DATA_AXIS.

    Args:
      batch: this process's rows, ``[B_global / process_count, ...]`` per leaf.
    """
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def fetch(tree: Any) -> Any:
    """Brings replicated (or fully addressable) arrays back to host NumPy."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def gather_to_host(x: jax.Array) -> np.ndarray:
    """All rows of a batch-sharded global array on every process, as NumPy."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ----------------------------------------------------------------------------- preemption


class PreemptionWatcher:
    """While active, SIGTERM and SIGINT ask training to stop after the current step.

    ``reached(step)`` is called once per step by every process and says whether to save and stop
    at that step:
      * one process: as soon as a signal arrived (a Python handler records it);
      * several processes: at the step JAX's preemption service agrees on
        (``multihost_utils.reached_preemption_sync_point``): a SIGTERM on any host is propagated
        to all and they stop at the same step. JAX listens to SIGTERM itself, so only SIGINT gets
        a handler here, which forwards it to this process as SIGTERM.
    A second Ctrl-C raises KeyboardInterrupt at once. Handlers are installed from the main thread
    only (elsewhere signals keep their default behaviour) and restored on exit.
    """

    def __init__(self):
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}
        self._multi = False
        self._announced = False

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number or signal.SIGTERM).name

    def __enter__(self) -> PreemptionWatcher:
        self._multi = jax.process_count() > 1
        if threading.current_thread() is not threading.main_thread():
            return self
        if self._multi and not _preemption_service_available():
            logging.warning(
                "JAX's preemption service is off (jax_enable_preemption_service): SIGTERM and "
                "SIGINT stop this multi-process run without a checkpoint"
            )
            return self
        for signum in (signal.SIGINT,) if self._multi else (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signal_number == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait.
        if self.signal_number is None:
            self.signal_number = signum
        if self._multi:  # Hand it to JAX's SIGTERM listener, which tells every process.
            os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, step: int) -> bool:
        """True at the step where this process (and every other) must save and stop."""
        if self._multi:
            from jax.experimental import multihost_utils

            try:
                stop = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # Preemption service off.
                stop = False
            if stop and self.signal_number is None:
                self.signal_number = signal.SIGTERM  # Another host was preempted.
        else:
            stop = self.signal_number is not None
        if stop and not self._announced:
            self._announced = True
            logging.warning(
                "%s received: saving a checkpoint at step %d, then stopping",
                self.signal_name,
                step,
            )
        return stop


def _preemption_service_available() -> bool:
    from jax._src import distributed  # No public accessor in JAX 0.10.

    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None
