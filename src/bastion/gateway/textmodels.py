"""What the gateway keeps of text models: tokenizers, task configs and input guards, built once.

A text version names its tokenizer by sha256 (``VersionInfo.text.tokenizer``); the control plane
keeps the JSON in Redis under ``tok:{sha256}``. The gateway fetches it the first time a version
needs it, checks that its bytes hash to that name (a tokenizer swapped in Redis is refused, never
used), loads it with the library's size and shape checks (in a thread: a large vocabulary takes a
while to parse) and keeps a bounded number of them in process. Concurrent first requests for one
tokenizer share one fetch.

Task configs are parsed once per version, and each model's input guards
(``Guards.build(parse_policy(...))``) once per policy: a snapshot that changes the policy builds
them again.

Tokenizer calls run in Rust and raise ``pyo3_runtime.PanicException`` (a ``BaseException``) on
input they cannot handle; ``tokenize`` turns that into a 400 instead of a crash.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

from bastion import logs
from bastion.errors import InvalidArtifact, InvalidInput, Unavailable
from bastion.guards import Guards, parse_policy
from bastion.snapshot import ModelRoutes, VersionInfo
from bastion.text.config import EmbeddingConfig, GenerationConfig
from bastion.text.jobs import TASK_EMBEDDING, TASK_GENERATION, tokenizer_key
from bastion.text.tokenizer import SpecialTokens, TextTokenizer, load_tokenizer

log = logs.get("bastion.gateway.text")

MAX_TOKENIZERS = 16  # distinct tokenizers kept in process (a version uses one)
MAX_CONFIGS = 256
MAX_GUARDS = 256
INLINE_CHARS = 8192  # texts up to this long are tokenized on the event loop; longer ones in a thread

_T = TypeVar("_T")
_Config = EmbeddingConfig | GenerationConfig


def tokenize(work: Callable[[], _T]) -> _T:
    """Run a tokenizer call; a panic in the Rust tokenizer is the input's 400, not a crash."""
    try:
        return work()
    except InvalidInput:
        raise
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit | asyncio.CancelledError):
            raise
        raise InvalidInput("the text could not be tokenized") from None


async def tokenize_async(work: Callable[[], _T], chars: int) -> _T:
    """``tokenize``, in a thread when the text is long (the event loop keeps serving meanwhile)."""
    if chars <= INLINE_CHARS:
        return tokenize(work)
    return await asyncio.to_thread(tokenize, work)


class TextModels:
    def __init__(self, max_tokenizer_bytes: int) -> None:
        self.max_tokenizer_bytes = max_tokenizer_bytes
        self._tokenizers: OrderedDict[tuple[str, SpecialTokens], TextTokenizer] = OrderedDict()
        self._loading: dict[tuple[str, SpecialTokens], asyncio.Future[TextTokenizer]] = {}
        self._configs: OrderedDict[tuple[str, int, str, str], _Config] = OrderedDict()
        self._guards: OrderedDict[str, tuple[bytes, Guards]] = OrderedDict()

    # configs ------------------------------------------------------------------------------
    def config(self, version: VersionInfo) -> _Config:
        """The version's task config (``EmbeddingConfig`` or ``GenerationConfig``)."""
        text = version.text
        if text is None:
            raise InvalidInput(f"model {version.model!r} is not a text model", param="model")
        key = (version.model, version.version, version.sha256, text.tokenizer)
        found = self._configs.get(key)
        if found is not None:
            return found
        try:
            if text.task == TASK_EMBEDDING:
                found = EmbeddingConfig.from_dict(text.config)
            elif text.task == TASK_GENERATION:
                found = GenerationConfig.from_dict(text.config)
            else:
                raise ValueError(f"unknown task {text.task[:40]!r}")
        except (ValueError, TypeError) as exc:
            log.warning(
                "text_config_invalid", model=version.model, version=version.version, error_type=type(exc).__name__
            )
            raise Unavailable(f"model {version.model!r} version {version.version} has an unusable config") from None
        self._configs[key] = found
        if len(self._configs) > MAX_CONFIGS:
            self._configs.popitem(last=False)
        return found

    # guards -------------------------------------------------------------------------------
    def guards(self, model: str, routes: ModelRoutes | None) -> Guards | None:
        """The model's input guards under its current policy; None when every guard is off."""
        policy = routes.guards if routes is not None else None
        if not policy:
            return None
        raw = orjson.dumps(policy, option=orjson.OPT_SORT_KEYS)
        held = self._guards.get(model)
        if held is not None and held[0] == raw:
            self._guards.move_to_end(model)
            return held[1]
        try:
            built = Guards.build(parse_policy(policy))
        except InvalidInput as exc:  # the control plane checks policies: this is a stale or hand-made one
            log.warning("guard_policy_invalid", model=model, error_type=type(exc).__name__)
            raise Unavailable(f"model {model!r} has an unusable guard policy") from None
        self._guards[model] = (raw, built)
        if len(self._guards) > MAX_GUARDS:
            self._guards.popitem(last=False)
        return built

    # tokenizers ---------------------------------------------------------------------------
    async def tokenizer(self, redis: Any, version: VersionInfo, special: SpecialTokens) -> TextTokenizer:
        """The version's tokenizer (fetched, checked and loaded on first use, then kept)."""
        if version.text is None:
            raise InvalidInput(f"model {version.model!r} is not a text model", param="model")
        key = (version.text.tokenizer, special)
        found = self._tokenizers.get(key)
        if found is not None:
            self._tokenizers.move_to_end(key)
            return found
        loading = self._loading.get(key)
        if loading is None:
            loading = asyncio.get_running_loop().create_future()
            self._loading[key] = loading
            try:
                found = await self._load(redis, version, version.text.tokenizer, special)
            except BaseException as exc:
                loading.set_exception(exc)
                loading.exception()  # retrieved: no "never retrieved" warning when nobody else waits
                raise
            finally:
                self._loading.pop(key, None)
            loading.set_result(found)
            self._tokenizers[key] = found
            if len(self._tokenizers) > MAX_TOKENIZERS:
                self._tokenizers.popitem(last=False)
            return found
        return await asyncio.shield(loading)

    async def _load(self, redis: Any, version: VersionInfo, sha256: str, special: SpecialTokens) -> TextTokenizer:
        try:
            data = await redis.get(tokenizer_key(sha256))
        except Exception as exc:
            raise Unavailable("the model's tokenizer cannot be read now; retry shortly", retry_after=1) from exc
        if data is None:
            log.warning("tokenizer_missing", model=version.model, version=version.version)
            raise Unavailable(f"the tokenizer of model {version.model!r} is not available yet; retry shortly")
        if hashlib.sha256(data).hexdigest() != sha256:
            log.error("tokenizer_digest_mismatch", model=version.model, version=version.version)
            raise Unavailable(f"the tokenizer of model {version.model!r} failed its integrity check")
        try:
            return await asyncio.to_thread(load_tokenizer, bytes(data), special, max_bytes=self.max_tokenizer_bytes)
        except InvalidArtifact as exc:
            log.error("tokenizer_unusable", model=version.model, version=version.version)
            raise Unavailable(f"the tokenizer of model {version.model!r} cannot be loaded") from exc
