"""The service's shared state (one :class:`ServeState` per app) and its metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from openimages_od.config import Config, ServeConfig
from openimages_od.serving.batcher import BatcherClosed, MicroBatcher
from openimages_od.serving.errors import ApiError
from openimages_od.serving.model import ExportedModel, ImageError, ImageInput, RawOutput, inspect_image
from openimages_od.serving.pools import Pools
from openimages_od.serving.s3_source import S3ImageSource
from openimages_od.serving.safe_fetch import SafeFetcher

__all__ = ["STATE", "Metrics", "ServeState"]


class Metrics:
    """Prometheus metrics in their own registry (so several apps/tests never collide)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "oiod_http_requests_total",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "oiod_http_request_duration_seconds",
            "Request latency by route.",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "oiod_batch_size",
            "Images per model call.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.inference = Histogram(
            "oiod_model_call_seconds",
            "Duration of one model call (a batch).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.inflight = Gauge(
            "oiod_http_requests_in_flight", "Requests being handled.", registry=self.registry
        )
        self.model_loaded = Gauge(
            "oiod_model_loaded", "1 when the model is loaded and the service ready.", registry=self.registry
        )
        self.pool_busy = Gauge(
            "oiod_pool_busy_threads", "Busy threads per work pool.", ["pool"], registry=self.registry
        )
        self.connections = Gauge(
            "oiod_open_connections", "Open client connections (guarded server only).", registry=self.registry
        )
        self.evictions = Counter(
            "oiod_connections_closed_total",
            "Client connections the server closed to stay under serve.max_connections.",
            ["reason"],
            registry=self.registry,
        )

    def observe_batch(self, n: int, seconds: float) -> None:
        self.batch_size.observe(n)
        self.inference.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


@dataclass
class ServeState:
    """Everything the handlers share; created by ``create_app``, filled at start-up."""

    cfg: Config
    metrics: Metrics
    model_url: str
    pools: Pools
    model: ExportedModel | None = None
    batcher: MicroBatcher | None = None
    fetcher: SafeFetcher | None = None
    s3: S3ImageSource | None = None
    storage: Any = None
    output_storage: Any = None
    token: str | None = None
    shutting_down: bool = False
    started: float = field(default_factory=time.time)

    @property
    def serve(self) -> ServeConfig:
        return self.cfg.serve

    @property
    def ready(self) -> bool:
        return self.model is not None and self.batcher is not None and not self.shutting_down

    @property
    def max_body_bytes(self) -> int:
        return int(self.serve.max_body_mb * 1024 * 1024)

    def require_ready(self) -> tuple[ExportedModel, MicroBatcher]:
        """The model and batcher, or 503 while loading or shutting down."""
        if self.shutting_down:
            raise ApiError(503, "shutting_down", "the service is shutting down")
        if self.model is None or self.batcher is None:
            raise ApiError(503, "not_ready", "the model is not loaded yet")
        return self.model, self.batcher

    async def inspect(self, data: bytes) -> ImageInput:
        """Header check (and conversion of non-JPEG/PNG formats) on the ``image`` pool."""
        return await self.pools.image.run(inspect_image, data, self.serve.max_pixels)

    async def predict(self, batcher: MicroBatcher, img: ImageInput, ticket: Any = None) -> RawOutput:
        """One image through the batcher; an image the model cannot decode is a 400."""
        try:
            return await batcher.submit(img.data, ticket)
        except (BatcherClosed, ApiError):
            raise
        except Exception as exc:
            if type(exc).__name__ in ("InvalidArgumentError", "UnknownError"):
                raise ImageError(400, "bad_image", "the model could not decode the image") from None
            raise


STATE = web.AppKey("oiod_state", ServeState)
