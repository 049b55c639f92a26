"""The pipeline's last stage: each step's batch put on the devices, and its data position."""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np

from dcgan_jax.data.pipeline import BATCH_KEYS


class Position:
    """A data position in the form grain's orbax handler saves (JSON bytes)."""

    def __init__(self, iterator: Any):
        state = iterator.get_state()
        self.state = state if isinstance(state, bytes) else json.dumps(state).encode()

    def get_state(self) -> bytes:
        return self.state


class DeviceBatches:
    """Each step's real batch, sharded over the mesh along its batch dimension and put on
    the devices while the step before it runs: {"image": [d_steps, batch, H, W, C] uint8,
    "label": [d_steps, batch] int32 (labelled sources)}. What else the pipeline's batches
    carry (unreadable files skipped) stays on the host, for `on_batch`.

    `take()` returns the batch and the data position just after it, which is what a
    checkpoint of that step must save; `prefetch()` loads the next one.
    """

    def __init__(self, iterator: Any, mesh: Any, d_steps: int,
                 on_batch: Callable[[dict[str, np.ndarray]], None] = lambda batch: None):
        self._iterator, self._mesh, self._d_steps = iterator, mesh, d_steps
        self._on_batch = on_batch
        self._next: tuple[dict[str, Any], Position] | None = None

    def prefetch(self) -> None:
        from dcgan_jax import parallel
        batch = next(self._iterator)
        self._on_batch(batch)
        local = {key: batch[key].reshape(self._d_steps, -1, *batch[key].shape[1:])
                 for key in BATCH_KEYS if key in batch}
        self._next = (parallel.global_batch(local, self._mesh, 1), Position(self._iterator))

    def take(self) -> tuple[dict[str, Any], Position]:
        if self._next is None:
            self.prefetch()
        taken, self._next = self._next, None
        return taken
