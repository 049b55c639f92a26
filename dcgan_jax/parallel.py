"""Devices, processes and shardings: one `data` mesh axis over every device of every host.

The train state is replicated and batches are sharded along their batch dimension, so a
single `jax.jit` step computes BatchNorm statistics and gradients over the global batch.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def _cluster_detected() -> bool:
    """Whether JAX can find the coordinator itself: a SLURM job or a Cloud TPU pod."""
    # SLURM_STEP_NUM_TASKS is set by srun; a batch script alone runs one process.
    return (int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1
            or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
            or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Joins a multi-host run, or does nothing on one host.

    Explicit arguments win; otherwise JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID are read; otherwise SLURM, Open MPI and TPU pods are auto-detected.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator_address and num_processes is not None and process_id is not None:
        if num_processes > 1:
            jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif coordinator_address or num_processes is not None or process_id is not None:
        raise ValueError(
            "A multi-host run needs all of --coordinator_address, --num_processes and "
            "--process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    elif _cluster_detected():
        jax.distributed.initialize()


def make_mesh() -> Mesh:
    """A one-axis mesh over all devices of all processes."""
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Shards dimension `batch_axis` over the data axis, replicating the others."""
    return NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), DATA_AXIS))


def global_batch(local_batch: Any, mesh: Mesh, batch_axis: int = 0) -> Any:
    """Assembles each process's rows into global arrays sharded along `batch_axis`.

    Process p holds rows [p * n, (p + 1) * n) of the global batch, n being its local size.
    """
    sharding = batch_sharded(mesh, batch_axis)

    def assemble(x: np.ndarray) -> jax.Array:
        global_shape = list(x.shape)
        global_shape[batch_axis] *= jax.process_count()
        return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))

    return jax.tree.map(assemble, local_batch)


def fetch(tree: Any) -> Any:
    """Brings replicated or fully addressable arrays to this host as numpy."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))
                        if isinstance(x, jax.Array) and not x.is_fully_addressable
                        else np.asarray(x), tree)
