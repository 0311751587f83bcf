"""The image-source plug-in interface and its registry.

An image source turns a plan row into a location (:meth:`ImageSource.resolve`),
fetches the bytes there (:meth:`ImageSource.fetch`) through the shared
:class:`FetchContext` (one HTTP session with the retry policy of
``source.images.http``, one storage layer whose backends retry transient errors
in :func:`openimages_od.storage.retry_call`), and says whether a failure is
permanent (:meth:`ImageSource.is_permanent`): a permanent one (the object is
missing, access is denied, the URL is malformed) will fail the same way on a
rerun; a transient one (timeouts, throttling, 5xx) may not.

The registry maps the names used in ``source.images.order`` to classes, named
as ``"module:Class"`` so that validating a config imports no source module.
Adding a source is one new module here plus one line in :data:`_REGISTRY`.
"""

from __future__ import annotations

import importlib
import string
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from openimages_od.config import ImageSources
    from openimages_od.storage import Storage

__all__ = [
    "FetchContext",
    "FetchFailed",
    "Fetched",
    "ImageSource",
    "check_key_template",
    "check_source_order",
    "is_permanent_reason",
    "register_source",
    "source_class",
    "source_names",
]

# One line per source: the name used in ``source.images.order`` -> "module:Class".
_REGISTRY: dict[str, str] = {
    "bucket": "openimages_od.pipeline.sources.bucket:BucketSource",
    "original": "openimages_od.pipeline.sources.http:OriginalSource",
    "thumbnail": "openimages_od.pipeline.sources.http:ThumbnailSource",
    "local": "openimages_od.pipeline.sources.local:LocalSource",
    "gcs": "openimages_od.pipeline.sources.gcs:GcsSource",
}

# Reasons that a rerun would meet again: the object or URL itself is the problem.
_PERMANENT_REASONS = frozenset(
    {
        "no_url",
        "bad_url",
        "bad_key",
        "bad_redirect",
        "bad_encoding",
        "too_large",
        "redirect_loop",
        "too_many_redirects",
        "placeholder_redirect",
        "http_error",
    }
)
_PERMANENT_SUFFIXES = ("_not_found", "_access_denied", "_is_directory")
# 4xx other than throttling and timeouts say "this request will never work".
_TRANSIENT_HTTP = frozenset({"http_408", "http_425", "http_429"})


class FetchFailed(Exception):
    """One source could not deliver the image.

    Attributes:
        reason: stable reason code (the ledger's ``error``).
        detail: human-readable detail.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Fetched:
    """Bytes one source delivered, with where they came from."""

    data: bytes
    source: str
    url: str
    final_url: str
    attempts: int


def is_permanent_reason(reason: str) -> bool:
    """Whether a :class:`FetchFailed` reason would recur on a rerun.

    Args:
        reason: the failure's reason code (``http_404``, ``timeout``, ``s3_not_found`` ...).

    Returns:
        True for a missing or refused object and a malformed URL or body; False for timeouts,
        connection failures, truncated bodies, throttling, 5xx and other store errors.
    """
    if reason in _PERMANENT_REASONS or reason.endswith(_PERMANENT_SUFFIXES):
        return True
    if reason.startswith("http_") and reason[5:].isdigit():
        code = int(reason[5:])
        return 400 <= code < 500 and reason not in _TRANSIENT_HTTP
    return False


class FetchContext(Protocol):
    """What the fetcher of one worker shares with every source."""

    @property
    def storage(self) -> Storage:
        """The storage layer (``s3://``, ``gs://``, local paths), retrying transient errors."""
        ...

    @property
    def max_bytes(self) -> int:
        """Largest image accepted (``source.images.http.max_body_mb``)."""
        ...

    async def read_object(self, source: str, url: str, reason_prefix: str) -> Fetched:
        """A bounded read of a storage URL off the event loop.

        Raises:
            FetchFailed: ``<prefix>_not_found``, ``<prefix>_access_denied``, ``<prefix>_error``,
                ``too_large``.
        """
        ...

    async def http_get(self, source: str, url: str) -> Fetched:
        """An http(s) GET with redirects checked and the retry policy applied.

        Raises:
            FetchFailed: with the HTTP reason after retries.
        """
        ...


class ImageSource(ABC):
    """One place image bytes can come from.

    Args:
        sources: the ``source.images`` config section (each source reads its own options there).
    """

    #: The name in ``source.images.order`` (and in the ledger's ``source``).
    name: ClassVar[str] = ""

    def __init__(self, sources: ImageSources) -> None:
        self.sources = sources

    @abstractmethod
    def resolve(self, row: Mapping[str, Any]) -> str | None:
        """The URL or key of the image of a plan row, or None when this source has none for it.

        Raises:
            FetchFailed: the row yields a location that must not be read (``bad_key``).
        """

    @abstractmethod
    async def fetch(self, url: str, ctx: FetchContext) -> Fetched:
        """The bytes at ``url`` (from :meth:`resolve`).

        Raises:
            FetchFailed: with a stable reason.
        """

    def is_permanent(self, failure: FetchFailed) -> bool:
        """Whether ``failure`` would recur on a rerun (see :func:`is_permanent_reason`)."""
        return is_permanent_reason(failure.reason)


def register_source(name: str, target: str) -> None:
    """Add a source at run time (a plug-in living outside this package).

    Args:
        name: the name for ``source.images.order``.
        target: ``"package.module:Class"`` of an :class:`ImageSource` subclass.
    """
    if ":" not in target:
        raise ValueError(f"image source target {target!r} must be 'module:Class'")
    _REGISTRY[name] = target


def source_names() -> tuple[str, ...]:
    """The registered source names, in registry order."""
    return tuple(_REGISTRY)


def source_class(name: str) -> type[ImageSource]:
    """The class registered as ``name``.

    Raises:
        KeyError: no such source (the message lists the known ones).
        TypeError: the registered target is not an :class:`ImageSource`.
    """
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown image source {name!r} (known: {', '.join(_REGISTRY)})") from None
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, ImageSource)):
        raise TypeError(f"image source {name!r} -> {target} is not an ImageSource subclass")
    return cls


def check_source_order(order: list[str]) -> list[str]:
    """Validate ``source.images.order``: known names, at least one, no repeats.

    Raises:
        ValueError: naming the offending entry and the known sources.
    """
    known = ", ".join(_REGISTRY)
    if not order:
        raise ValueError(f"must list at least one image source (known: {known})")
    for name in order:
        if name not in _REGISTRY:
            raise ValueError(f"unknown image source {str(name)[:60]!r} (known: {known})")
    if len(set(order)) != len(order):
        raise ValueError("must not repeat a source")
    return order


def check_key_template(template: str) -> str:
    """Validate an object-key template: only ``{split}`` and ``{image_id}``, no conversions or specs.

    Parsed, not tried: a format spec such as ``{image_id:>999999999}`` would allocate gigabytes.

    Raises:
        ValueError: what is wrong with the template.
    """
    if len(template) > 512:
        raise ValueError("must be at most 512 characters")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"is not a valid template ({exc})") from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in ("split", "image_id"):
            raise ValueError(f"may only use the fields {{split}} and {{image_id}} (got {{{name[:40]}}})")
        if spec or conversion:
            conv = "!" + conversion if conversion else ""
            fmt = ":" + spec[:20] if spec else ""
            raise ValueError(
                f"{{{name}}} may not have a conversion or format spec (got {{{name}{conv}{fmt}}})"
            )
    return template
