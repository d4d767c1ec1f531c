"""What an uploader says about a version, and what a model's owners require before production.

``VersionMetadata`` travels with the artifact at registration and is immutable with it: the
model card, owner, training-data lineage, offline metrics, post-processing, the refined
signature (feature names, allowed ranges and categories, output labels) and a reference sample
(kept for drift). ``GatePolicy`` is set per model and decides what a version must show to enter
``production``.

Sizes are capped: every list and string has a bound, and the whole document as JSON (without the
reference sample, which is kept in the artifact store) is at most ``max_metadata_bytes``
(``check_size``: a 413 naming the largest field), so a version never weighs on the registry or on
the snapshot that gateways and workers read.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bastion.errors import InvalidInput, PayloadTooLarge
from bastion.signature import Feature as SignatureFeature
from bastion.signature import Signature

_NAME = r"^[A-Za-z0-9_.:/ -]{1,64}$"
_Model = TypeVar("_Model", bound=BaseModel)
Label = Annotated[str, Field(max_length=256)]
Key = Annotated[str, Field(min_length=1, max_length=128)]
MAX_REFERENCE_SAMPLE_BYTES = 16 << 20  # the reference sample's JSON, on top of max_metadata_bytes


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Feature(_Strict):
    """One column of a rank-2 input: its name and what values it may take."""

    name: str = Field(pattern=_NAME)
    min: float | None = None
    max: float | None = None
    categories: list[float] | None = Field(default=None, max_length=1024)

    @model_validator(mode="after")
    def _bounds(self) -> Feature:
        for value in (self.min, self.max, *(self.categories or [])):
            if value is not None and not math.isfinite(value):
                raise ValueError("bounds and categories must be finite numbers")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"feature {self.name!r}: min is above max")
        return self


class InputRefinement(_Strict):
    features: list[Feature] = Field(max_length=10_000)


class OutputRefinement(_Strict):
    labels: list[Label] = Field(max_length=10_000, description="class names, by class index")


class SignatureRefinement(_Strict):
    inputs: dict[Annotated[str, Field(max_length=512)], InputRefinement] = Field(default_factory=dict, max_length=64)
    outputs: dict[Annotated[str, Field(max_length=512)], OutputRefinement] = Field(default_factory=dict, max_length=64)


class Lineage(_Strict):
    dataset: str = Field(min_length=1, max_length=256)
    version: str = Field(default="", max_length=128)
    digest: str = Field(default="", max_length=128, description="e.g. the sha256 of the training data")


class PostProcessing(_Strict):
    """How outputs are read: which output holds the label, which the scores, and the threshold."""

    label_output: str | None = Field(default=None, max_length=128)
    score_output: str | None = Field(default=None, max_length=128)
    positive_label: int = Field(default=1, ge=0, le=1_000_000)
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)


class TextSection(_Strict):
    """A text version's task and config (``bastion.text.config``); it comes with a tokenizer. The
    registry adds the tokenizer's ``tokenizer`` (sha256) and ``tokenizer_bytes`` when it stores them."""

    task: Literal["embedding", "generation"]
    config: dict[Annotated[str, Field(max_length=64)], Any] = Field(default_factory=dict, max_length=32)
    tokenizer: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    tokenizer_bytes: int | None = Field(default=None, ge=0)


class VersionMetadata(_Strict):
    description: str = Field(default="", max_length=4000)
    owner: str = Field(default="", max_length=128)
    model_card: str = Field(default="", max_length=200_000)
    lineage: Lineage | None = None
    offline_metrics: dict[Key, float] = Field(default_factory=dict, max_length=64)
    postprocessing: PostProcessing = Field(default_factory=PostProcessing)
    signature: SignatureRefinement = Field(default_factory=SignatureRefinement)
    rows_independent: bool = True
    text: TextSection | None = None
    reference_sample: dict[Annotated[str, Field(max_length=512)], list[Any]] | None = Field(
        default=None, max_length=64, description="input name -> rows, kept as the drift baseline"
    )

    @field_validator("offline_metrics")
    @classmethod
    def _finite(cls, value: dict[str, float]) -> dict[str, float]:
        if any(not math.isfinite(v) for v in value.values()):
            raise ValueError("offline metrics must be finite numbers")
        return value

    def documented(self) -> list[str]:
        """The documentation the documentation gate asks for that is missing."""
        missing = []
        if len(self.model_card.strip()) < 20:
            missing.append("model_card")
        if not self.owner.strip():
            missing.append("owner")
        if self.lineage is None:
            missing.append("lineage")
        return missing


class GatePolicy(_Strict):
    """A model's gates for entering ``production``; unset thresholds are not checked."""

    min_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    min_auc: float | None = Field(default=None, ge=0.0, le=1.0)
    min_f1: float | None = Field(default=None, ge=0.0, le=1.0)
    max_demographic_parity_difference: float | None = Field(default=None, ge=0.0, le=1.0)
    max_equal_opportunity_difference: float | None = Field(default=None, ge=0.0, le=1.0)
    require_documentation: bool = False
    require_approval: bool = False
    require_verified: bool = False
    max_artifact_bytes: int | None = Field(default=None, ge=1, le=1 << 40)  # JSON-safe: a 64-bit integer

    @property
    def metric_gates(self) -> dict[str, float]:
        return {
            name: value
            for name, value in (("accuracy", self.min_accuracy), ("auc", self.min_auc), ("f1", self.min_f1))
            if value is not None
        }

    @property
    def fairness_gates(self) -> dict[str, float]:
        return {
            name: value
            for name, value in (
                ("demographic_parity_difference", self.max_demographic_parity_difference),
                ("equal_opportunity_difference", self.max_equal_opportunity_difference),
            )
            if value is not None
        }

    @property
    def gated(self) -> bool:
        """True when entering production needs more than an operator's say-so."""
        return bool(
            self.metric_gates
            or self.fairness_gates
            or self.require_documentation
            or self.require_approval
            or self.require_verified
        )


def parse(kind: type[_Model], data: Any, what: str) -> _Model:
    """Validate ``data`` as ``kind`` or raise ``InvalidInput`` naming the fields that are wrong."""
    try:
        return kind.model_validate(data if data is not None else {})
    except ValidationError as exc:
        found = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or what}: {e['msg']}" for e in exc.errors(include_url=False)[:5]
        )
        raise InvalidInput(f"{what} is invalid: {found}") from exc


def check_size(doc: dict[str, Any], limit: int, what: str) -> None:
    """Refuse (413) a document whose JSON is over ``limit`` bytes, naming its largest field."""
    size = len(orjson.dumps(doc))
    if size <= limit:
        return
    field, largest = max(((str(k), len(orjson.dumps(v))) for k, v in doc.items()), key=lambda kv: kv[1])
    raise PayloadTooLarge(
        f"{what} is {size} bytes as JSON; the limit is {limit} bytes (max_metadata_bytes): "
        f"its largest field is '{field}' ({largest} bytes)",
        field=field,
        limit=limit,
    )


def refine(signature: Signature, refinement: SignatureRefinement) -> Signature:
    """The ONNX signature with the uploader's feature names, ranges, categories and output labels."""
    inputs = {s.name: s for s in signature.inputs}
    outputs = {s.name: s for s in signature.outputs}
    for name in set(refinement.inputs) - set(inputs):
        raise InvalidInput(f"the refined signature names input {name!r}, which the model does not have")
    for name in set(refinement.outputs) - set(outputs):
        raise InvalidInput(f"the refined signature names output {name!r}, which the model does not have")
    for name, spec in refinement.inputs.items():
        shape = inputs[name].shape
        if len(shape) != 2 or shape[1] != len(spec.features):
            raise InvalidInput(
                f"input {name!r} has shape {list(shape)}; features can be named only for a rank-2 input "
                f"with a fixed number of columns equal to the {len(spec.features)} features given"
            )
        features = tuple(
            SignatureFeature(f.name, f.min, f.max, tuple(f.categories) if f.categories is not None else None)
            for f in spec.features
        )
        inputs[name] = replace(inputs[name], features=features)
    for name, out in refinement.outputs.items():
        outputs[name] = replace(outputs[name], labels=tuple(out.labels))
    return replace(signature, inputs=tuple(inputs.values()), outputs=tuple(outputs.values()))


def stored(meta: dict[str, Any] | None) -> VersionMetadata:
    """A version's metadata as stored: the reference sample is kept as ``reference`` (a digest)."""
    return VersionMetadata.model_validate({k: v for k, v in (meta or {}).items() if k != "reference"})


def check_postprocessing(signature: Signature, post: PostProcessing) -> None:
    """Named outputs exist; a threshold needs a score output of a binary model (1 or 2 columns)."""
    outputs = {o.name: o for o in signature.outputs}
    for name in (post.label_output, post.score_output):
        if name is not None and name not in outputs:
            raise InvalidInput(f"the post-processing names output {name!r}, which the model does not have")
    if post.threshold is None:
        return
    score = outputs.get(post.score_output or "") or next(
        (o for o in signature.outputs if o.dtype.startswith("float")), None
    )
    if score is None or len(score.shape) > 2 or (len(score.shape) == 2 and score.shape[1] not in (1, 2)):
        raise InvalidInput("a decision threshold needs a binary model: a score output with 1 or 2 columns")
