"""The worker's loaded models: verified against their sha256 before loading, cached by version.

On every new snapshot the worker ``sync``s its cache with the deployments: versions that any
route or fallback of its models uses, or is about to (``preload``), are loaded and warmed up
with one inference on zeros (so the first real request does not pay for session start-up; a text
model on one token), and
versions nothing routes to are unloaded. A job for another version (a job queued before a
rollback, say) loads it on demand. A text version (``VersionInfo.text``) loads as
``worker.text``'s embedding or generation model, its tokenizer read from the artifact store and
checked against its sha256 as the graph is (an upstream version's artifact is its descriptor,
checked the same way: the server its generation is forwarded to is the descriptor's,
``worker.text.UpstreamModel``).
"""

from __future__ import annotations

import time

import numpy as np

from bastion import logs, metrics
from bastion.artifacts.store import ArtifactStore
from bastion.errors import IntegrityError, JobFailed, NotFound
from bastion.runtime.base import LoadedModel, Runtime
from bastion.snapshot import Snapshot, VersionInfo
from bastion.worker import postprocess, text

log = logs.get("bastion.worker")


class ModelCache:
    def __init__(self, store: ArtifactStore, runtime: Runtime, retry_s: float = 30.0) -> None:
        self.store = store
        self.retry_s = retry_s
        self.runtime = runtime
        self._loaded: dict[tuple[str, int], LoadedModel] = {}
        self._refused: dict[tuple[str, int], tuple[float, str]] = {}

    def get(self, snapshot: Snapshot, model: str, version: int) -> LoadedModel:
        """The loaded model, or ``NotFound`` / ``IntegrityError`` saying why it cannot run."""
        key = (model, version)
        loaded = self._loaded.get(key)
        if loaded is not None:
            return loaded
        info = snapshot.versions.get(key)
        if info is None:
            raise NotFound(f"model {model!r} version {version} is not registered")
        refused = self._refused.get(key)
        if refused is not None and time.monotonic() - refused[0] < self.retry_s:
            raise JobFailed(refused[1])
        try:
            loaded = self._open(info)
        except IntegrityError as exc:
            metrics.ERRORS.labels("worker", "artifact_integrity").inc()
            log.error("artifact_refused", model=model, version=version, sha256=info.sha256, reason=exc.detail)
            raise self._refuse(key, f"model {model!r} version {version} failed its integrity check") from exc
        except Exception as exc:
            metrics.ERRORS.labels("worker", "model_load").inc()
            log.error(
                "model_load_failed", model=model, version=version, sha256=info.sha256, error_type=type(exc).__name__
            )
            raise self._refuse(key, f"model {model!r} version {version} could not be loaded") from exc
        self._refused.pop(key, None)
        self._loaded[key] = loaded
        metrics.MODELS_LOADED.set(len(self._loaded))
        log.info("model_loaded", model=model, version=version, sha256=info.sha256)
        return loaded

    def _open(self, info: VersionInfo) -> LoadedModel:
        """The version's model; a text version's tokenizer is verified against its digest too."""
        if info.text is None:
            return postprocess.wrap(
                self.runtime.load(self.store.open(info.sha256)), info.signature, info.postprocessing
            )
        graph = self.store.open(info.sha256)  # (an upstream version's: its descriptor, verified all the same)
        tokenizer = self.store.open(info.text.tokenizer)
        return text.load(
            info.text,
            graph,
            tokenizer,
            intra_threads=int(getattr(self.runtime, "intra_threads", 1)),
            inter_threads=int(getattr(self.runtime, "inter_threads", 1)),
        )

    def sync(self, snapshot: Snapshot, models: list[str]) -> None:
        """Load and warm up every routed version of ``models``; unload the versions nothing routes to."""
        wanted: set[tuple[str, int]] = set()
        for name in models:
            routes = snapshot.models.get(name)
            if routes is None:
                continue
            wanted |= {(name, r.version.version) for r in routes.routes}
            wanted |= {(name, v) for v in routes.preload if (name, v) in snapshot.versions}
            if routes.fallback is not None:
                wanted.add((name, routes.fallback.version))
        for key in set(self._loaded) - wanted:
            del self._loaded[key]
            log.info("model_unloaded", model=key[0], version=key[1])
        for name, version in sorted(wanted - set(self._loaded)):
            try:
                loaded = self.get(snapshot, name, version)
            except (JobFailed, NotFound):
                continue  # already logged; its jobs fail with the reason
            self._warm_up(snapshot, name, version, loaded)
        metrics.MODELS_LOADED.set(len(self._loaded))

    def loaded_versions(self) -> set[tuple[str, int]]:
        return set(self._loaded)

    def loaded_models(self) -> dict[tuple[str, int], LoadedModel]:
        return dict(self._loaded)

    @staticmethod
    def _warm_up(snapshot: Snapshot, model: str, version: int, loaded: LoadedModel) -> None:
        signature = snapshot.versions[(model, version)].signature
        try:
            if isinstance(loaded, text.EmbeddingModel | text.GenerationModel | text.UpstreamModel):
                loaded.warm_up()  # one pad token (one token of a prompt): what a text model accepts
                return
            inputs = {s.name: np.zeros([d or 1 for d in s.shape], dtype=s.dtype) for s in signature.inputs}
            loaded.run(inputs)
        except Exception as exc:  # a model may refuse zeros; real inputs will tell
            log.warning("warm_up_failed", model=model, version=version, error_type=type(exc).__name__)

    def _refuse(self, key: tuple[str, int], message: str) -> JobFailed:
        """Remember a refusal for a while, so a broken version is not reloaded on every batch."""
        self._refused[key] = (time.monotonic(), message + "; it is not served")
        return JobFailed(self._refused[key][1])
