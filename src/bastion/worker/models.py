"""The worker's loaded models: verified against their sha256 before loading, cached by version."""

from __future__ import annotations

from bastion import logs, metrics
from bastion.artifacts.store import ArtifactStore
from bastion.errors import IntegrityError, NotFound
from bastion.runtime.base import LoadedModel, Runtime
from bastion.snapshot import Snapshot

log = logs.get("bastion.worker")


class ModelCache:
    def __init__(self, store: ArtifactStore, runtime: Runtime) -> None:
        self.store = store
        self.runtime = runtime
        self._loaded: dict[tuple[str, int], LoadedModel] = {}
        self._refused: dict[tuple[str, int], str] = {}

    def get(self, snapshot: Snapshot, model: str, version: int) -> LoadedModel:
        """The loaded model, or ``NotFound`` / ``IntegrityError`` saying why it cannot run."""
        key = (model, version)
        loaded = self._loaded.get(key)
        if loaded is not None:
            return loaded
        info = snapshot.versions.get(key)
        if info is None:
            raise NotFound(f"model {model!r} version {version} is not registered")
        try:
            artifact = self.store.open(info.sha256)
        except IntegrityError as exc:
            metrics.ERRORS.labels("worker", "artifact_integrity").inc()
            log.error("artifact_refused", model=model, version=version, sha256=info.sha256, reason=exc.detail)
            raise
        loaded = self.runtime.load(artifact)
        self._loaded[key] = loaded
        metrics.MODELS_LOADED.set(len(self._loaded))
        log.info("model_loaded", model=model, version=version, sha256=info.sha256)
        return loaded
