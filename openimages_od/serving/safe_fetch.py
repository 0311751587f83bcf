"""Fetching images named by URL in a request, without becoming an SSRF proxy.

Rules (all enforced before any connection is made):

* only ``http`` and ``https`` URLs (``s3://`` is :mod:`openimages_od.serving.s3_source`);
* a host that is an IP literal is checked directly; any other host is resolved
  by :class:`GuardedResolver` (an aiohttp resolver), which checks EVERY address
  the name resolves to and hands aiohttp only checked addresses, so the socket
  connects to exactly what was checked (no DNS-rebinding window);
* refused: loopback, private, link-local, multicast, reserved, unspecified,
  shared (CGNAT) and other non-global addresses, IPv4-mapped/6to4 forms of
  them, and the cloud metadata endpoints (169.254.169.254, fd00:ec2::254,
  metadata.google.internal, ...), which stay refused even when allow-listed;
* redirects are followed by hand, each hop re-checked the same way, at most
  ``max_redirects``;
* ``allow_networks`` (CIDRs or host names, ``*.suffix`` wildcards) exempts
  in-cluster sources;
* the body is read in chunks and cut off at ``max_bytes`` (413), the whole
  fetch is bounded by ``timeout_s`` (504), and the upstream content type must be
  an image or octet-stream (415).

Tests (and operators with unusual DNS) can pass their own ``base_resolver``
(any :class:`aiohttp.abc.AbstractResolver`); the guard still checks what it
returns.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urljoin

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from openimages_od.serving.errors import ApiError

__all__ = ["AddressPolicy", "BlockedAddress", "GuardedResolver", "SafeFetcher", "StaticResolver"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud instance-metadata endpoints: refused even if an allow-list covers them.
METADATA_IPS = {
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean
        "fd00:ec2::254",  # AWS IPv6
        "169.254.170.2",  # AWS ECS task metadata
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
    )
}
METADATA_HOSTS = {
    "metadata.google.internal",
    "metadata.goog",
    "metadata",
    "instance-data",
    "instance-data.ec2.internal",
}


class BlockedAddress(ApiError):
    """The URL's host is (or resolves to) an address the guard refuses."""

    def __init__(self, message: str) -> None:
        super().__init__(403, "blocked_address", message)


def _unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address hidden in IPv4-mapped, 6to4 and Teredo IPv6 forms (else ``ip``)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            return ip.ipv4_mapped
        if ip.sixtofour:
            return ip.sixtofour
        if ip.teredo:
            return ip.teredo[1]
    return ip


class AddressPolicy:
    """Which hosts and addresses may be fetched.

    Args:
        allow_networks: CIDRs (``10.0.0.0/8``), single IPs, or host names
            (``minio.storage.svc``, ``*.svc.cluster.local``) exempt from the
            private-address rule.
    """

    def __init__(self, allow_networks: Iterable[str] = ()) -> None:
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.hosts: list[str] = []
        for entry in allow_networks:
            entry = entry.strip()
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.append(entry.lower().rstrip("."))

    def host_allowed(self, host: str) -> bool:
        h = host.lower().rstrip(".")
        return any(fnmatch.fnmatchcase(h, pat) for pat in self.hosts)

    def check_host(self, host: str) -> None:
        """Refuse metadata host names before resolving them."""
        if host.lower().rstrip(".") in METADATA_HOSTS:
            raise BlockedAddress(f"host {host} is a cloud metadata endpoint")

    def check_ip(self, host: str, ip: IPAddress) -> None:
        """Raise :class:`BlockedAddress` unless ``ip`` (which ``host`` resolved to) may be fetched."""
        inner = _unwrap(ip)
        if ip in METADATA_IPS or inner in METADATA_IPS:
            raise BlockedAddress(f"host {host} is a cloud metadata address ({ip})")
        if self.host_allowed(host) or any(
            inner in n or ip in n for n in self.networks if n.version in (4, 6)
        ):
            return
        bad = (
            inner.is_loopback
            or inner.is_private
            or inner.is_link_local
            or inner.is_multicast
            or inner.is_reserved
            or inner.is_unspecified
            or not inner.is_global
            or ip.is_multicast
            or ip.is_reserved
            or not ip.is_global
        )
        if bad:
            raise BlockedAddress(
                f"host {host} resolves to a non-public address ({ip}); "
                f"only public addresses may be fetched (see serve.allow_networks)"
            )


class StaticResolver(AbstractResolver):
    """A resolver from a fixed ``{hostname: [ip, ...]}`` table (tests, /etc/hosts-like pinning)."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = {k.lower(): v for k, v in table.items()}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        ips = self.table.get(host.lower().rstrip("."))
        if not ips:
            raise OSError(socket.EAI_NONAME, f"cannot resolve {host}")
        return [
            ResolveResult(
                hostname=host,
                host=ip,
                port=port,
                family=socket.AF_INET6 if ":" in ip else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for ip in ips
        ]

    async def close(self) -> None:
        return None


class GuardedResolver(AbstractResolver):
    """Resolves with ``base`` and refuses the host if ANY resolved address is refused."""

    def __init__(self, policy: AddressPolicy, base: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.base = base or aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.policy.check_host(host)
        results = await self.base.resolve(host, port, family)
        for r in results:
            self.policy.check_ip(host, ipaddress.ip_address(r["host"].split("%", 1)[0]))
        return results

    async def close(self) -> None:
        await self.base.close()


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


class SafeFetcher:
    """Fetch image bytes by URL under the rules in the module docstring.

    Args:
        policy: the address policy.
        max_bytes: body limit (413 above it).
        timeout_s: limit for the whole fetch including redirects (504).
        max_redirects: hops followed (each re-checked).
        base_resolver: DNS resolver the guard wraps (default: the system resolver in a thread).
        user_agent: the User-Agent sent upstream.
    """

    def __init__(
        self,
        policy: AddressPolicy,
        max_bytes: int,
        timeout_s: float,
        max_redirects: int = 3,
        base_resolver: AbstractResolver | None = None,
        user_agent: str = "openimages-od-serve/0.1",
    ) -> None:
        self.policy = policy
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self.base_resolver = base_resolver
        self.user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            resolver = GuardedResolver(self.policy, self.base_resolver)
            # No DNS cache: every connection re-resolves through the guard.
            connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, limit=64)
            self._session = aiohttp.ClientSession(
                connector=connector,
                trust_env=False,
                headers={"User-Agent": self.user_agent},
                timeout=aiohttp.ClientTimeout(
                    sock_connect=min(5.0, self.timeout_s), sock_read=self.timeout_s
                ),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def check_url(self, url: str) -> URL:
        """Scheme and literal-address checks for one hop (names are checked at resolve time)."""
        try:
            u = URL(url)
            host = u.host
        except (ValueError, TypeError, UnicodeError):
            raise ApiError(400, "bad_url", "the image URL is not a valid URL") from None
        if u.scheme not in ("http", "https"):
            raise ApiError(
                400,
                "unsupported_scheme",
                f"URL scheme {u.scheme or '(none)'!r} is not allowed (use http, https or s3)",
            )
        if not host:
            raise ApiError(400, "bad_url", "the image URL has no host")
        if u.user or u.password:
            raise ApiError(400, "bad_url", "credentials in image URLs are not allowed")
        self.policy.check_host(host)
        ip = _ip_literal(host)
        if ip is not None:
            self.policy.check_ip(host, ip)
        return u

    async def fetch(self, url: str) -> tuple[bytes, str]:
        """Return ``(body, content_type)`` for an ``http(s)://`` URL.

        Raises:
            ApiError: 400 bad URL, 403 refused address, 413 too large, 415 not an image,
                422 upstream failure (also a redirect to an invalid URL), 504 timeout.
        """
        try:
            return await asyncio.wait_for(self._fetch_http(url), self.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(
                504, "fetch_timeout", f"fetching the image took longer than {self.timeout_s:g}s"
            ) from None

    async def _fetch_http(self, url: str) -> tuple[bytes, str]:
        session = await self._get_session()
        current = url
        for hop in range(self.max_redirects + 1):
            u = self.check_url(current)
            try:
                async with session.get(u, allow_redirects=False, auto_decompress=True) as resp:
                    if resp.status in (301, 302, 303, 307, 308):
                        loc = resp.headers.get("Location")
                        if not loc:
                            raise ApiError(
                                422, "fetch_failed", f"upstream answered {resp.status} with no Location"
                            )
                        try:
                            current = urljoin(str(u), loc)
                        except ValueError:  # e.g. "http://[::1": not the caller's fault, not ours either
                            raise ApiError(
                                422, "fetch_failed", "upstream redirected to an invalid URL"
                            ) from None
                        continue
                    if resp.status != 200:
                        raise ApiError(422, "fetch_failed", f"upstream answered HTTP {resp.status}")
                    ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
                    if ctype and not (
                        ctype.startswith("image/")
                        or ctype in ("application/octet-stream", "binary/octet-stream")
                    ):
                        raise ApiError(
                            415, "unsupported_media_type", f"upstream content type {ctype!r} is not an image"
                        )
                    if resp.content_length is not None and resp.content_length > self.max_bytes:
                        raise ApiError(
                            413,
                            "image_too_large",
                            f"image is {resp.content_length} bytes; the limit is {self.max_bytes}",
                        )
                    chunks, total = [], 0
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        total += len(chunk)
                        if total > self.max_bytes:
                            raise ApiError(
                                413, "image_too_large", f"image exceeds the limit of {self.max_bytes} bytes"
                            )
                        chunks.append(chunk)
                    return b"".join(chunks), ctype
            except ApiError:
                raise
            except (aiohttp.InvalidURL, ValueError):
                raise ApiError(
                    400 if hop == 0 else 422,
                    "bad_url" if hop == 0 else "fetch_failed",
                    "the image URL is not valid" if hop == 0 else "upstream redirected to an invalid URL",
                ) from None
            except (aiohttp.ClientError, OSError) as exc:
                raise ApiError(
                    422, "fetch_failed", f"could not fetch the image ({type(exc).__name__})"
                ) from None
        raise ApiError(422, "too_many_redirects", f"more than {self.max_redirects} redirects")
