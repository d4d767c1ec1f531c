"""The runtime seam: ``load(artifact)`` then ``run(batch)``. Test fakes live here only."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class LoadedModel(Protocol):
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batched call; every output's first dimension matches the inputs' rows."""
        ...

    def terminate(self) -> None:
        """Ask a ``run`` in progress on another thread to stop: it raises soon after. The watchdog
        asks again on every tick while the call runs, so this must be safe to call repeatedly, and
        ``run`` clears a stop left from before when it starts."""
        ...


class Runtime(Protocol):
    def load(self, artifact: bytes) -> LoadedModel: ...
