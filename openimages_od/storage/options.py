"""Connection options of the remote stores (``s3://``, ``gs://``).

They live with the storage layer, not in :mod:`openimages_od.config`, so storage
imports no config (the config re-exports them and embeds them as sections).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["GcsOptions", "S3Options"]


class _Options(BaseModel):
    # The same strictness as every config section: unknown keys are errors.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class S3Options(_Options):
    """How to reach an S3-compatible store (AWS, SeaweedFS, MinIO, GCS interop)."""

    endpoint_url: str | None = Field(
        default=None, description="Endpoint URL; null = AWS (or AWS_ENDPOINT_URL)."
    )
    region: str | None = Field(
        default=None, description="Region name; null = the credential chain's default."
    )
    unsigned: bool = Field(
        default=False, description="Anonymous requests (public buckets such as open-images-dataset)."
    )
    profile: str | None = Field(default=None, description="Named profile from ~/.aws/config.")
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(
        default=5, ge=1, le=20, description="Attempts for transient errors (capped exponential backoff)."
    )
    multipart_threshold_mb: int = Field(default=64, ge=5)
    max_pool_connections: int = Field(default=32, ge=1)


class GcsOptions(_Options):
    """How to reach Google Cloud Storage (or a compatible emulator) for ``gs://`` URLs."""

    endpoint_url: str | None = Field(
        default=None,
        description="JSON API endpoint; null = Google (or STORAGE_EMULATOR_HOST). A fake server: http://host:port.",
    )
    anonymous: bool | None = Field(
        default=None,
        description="true = unauthenticated (public buckets); false = application default credentials; "
        "null = credentials when found, else anonymous.",
    )
    project: str | None = Field(
        default=None, description="Project for the client; null = from the credentials."
    )
    timeout_s: float = Field(default=60.0, gt=0, description="Per-request connect and read timeout.")
    max_attempts: int = Field(
        default=5, ge=1, le=20, description="Attempts for transient errors (capped exponential backoff)."
    )
