"""Typed bodies of the replica's public API (what `openapi.yaml` documents)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

REQUEST_ID_PATTERN = r"^[A-Za-z0-9_-]{16,128}$"
REQUEST_ID_HEADER = "X-Request-Id"  # optional copy of the body's request_id, for L7 balancers


class Tensor(BaseModel):
    """An int64 tensor: base64 of its little-endian bytes in C order, never a list of numbers."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"example": {"dtype": "int64", "shape": [1, 10], "data": "AAAA..."}},
    )
    dtype: Literal["int64"] = Field(description="always int64: ring elements of Z_2^64")
    shape: list[int] = Field(min_length=1, max_length=8, description="C-order dimensions")
    data: str = Field(description="standard base64 (padded) of the little-endian int64 values")


class PredictRequest(BaseModel):
    """One party's share of a batch of images; the same request id goes to both replicas."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "request_id": "4fJx0v1bQk2m9Zr7TtYw3A",
                "input": {"dtype": "int64", "shape": [1, 1, 28, 28], "data": "<base64>"},
                "output": "label",
                "model_version": "3f2a9c1d0b7e-5c1a2b3d",
            }
        },
    )
    request_id: str = Field(
        pattern=REQUEST_ID_PATTERN,
        description="16-128 characters of [A-Za-z0-9_-], fresh per request, accepted once",
    )
    input: Tensor = Field(
        description="this party's additive share of the images, shape [n, 1, 28, 28], fixed "
        "point with the model's frac_bits (pixel/255, ink bright)"
    )
    output: Literal["label", "scores"] = Field(
        default="label",
        description="label: shares that show the label only (see `sharing`); "
        "scores: shares of logits",
    )
    model_version: str | None = Field(
        default=None, max_length=128, description="the version the client expects (optional)"
    )


class PredictResponse(BaseModel):
    request_id: str
    party: int
    model_version: str
    output: Literal["label", "scores"]
    sharing: Literal["zero", "xor", "additive"] = Field(
        description="zero: the two shares add, mod the prime 65521, to [n, 10] values that are 0 "
        "at the label and uniform on 1..65520 elsewhere (comparison a2b); xor: they XOR to a "
        "one-hot [n, 10] (fss, hybrid); additive: they add (mod 2^64) to the logits at frac_bits"
    )
    frac_bits: int
    share: Tensor
    serving_version: str | None = Field(
        description="the newest version both replicas hold now; when it differs from "
        "model_version, a newer model is being served: fetch /v1/model again"
    )
    rounds: int = Field(description="protocol rounds of the run with the peer")
    peer_bytes: int = Field(description="bytes this replica sent to its peer for the batch")
    batch_images: int = Field(
        description="images in the protocol run this request joined (dynamic batching); "
        "rounds and peer_bytes are that run's"
    )


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. replayed_request")
    message: str = Field(description="what went wrong and how to fix it, for humans")


class ErrorBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "error": {
                    "code": "replayed_request",
                    "message": "request id '4fJx0v1bQk2m9Zr7TtYw3A' was already used",
                }
            }
        }
    )
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]
    party: int


class ReplicaHealth(Health):
    pair: str = Field(description="the replica pair this replica belongs to (`--pair`)")


class Readiness(BaseModel):
    ready: bool
    party: int
    model_version: str | None = Field(description="the newest version this replica holds")
    serving_version: str | None = Field(description="the version both replicas hold and serve")
    peer_connected: bool
    peer_versions: list[str]
    reasons: list[str] = Field(description="why not ready (empty when ready)")
    last_reload_error: str | None = None


class ComparisonInfo(BaseModel):
    name: str = Field(description="the comparison protocol (`python -m service protocols`)")
    summary: str
    label_sharing: Literal["zero", "xor"] = Field(
        description="how the replicas hand out a label (see PredictResponse.sharing)"
    )


class ModelInfo(BaseModel):
    party: int
    model_version: str
    serving_version: str | None
    created: str | None
    architecture: dict[str, Any]
    fixed_point: dict[str, int]
    shares: list[dict[str, Any]]
    provenance: dict[str, Any] | None = Field(
        default=None,
        description="how the model was made (`python -m training`): the command, code version, "
        "federated setting, DP, secure aggregation, plaintext and private test accuracy",
    )
    comparison: ComparisonInfo
    scores_enabled: bool
    max_batch: int


class ReloadResult(BaseModel):
    changed: bool
    model_version: str
    message: str
