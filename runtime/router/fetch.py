"""http(s) image URLs, fetched by the router when the operator enables them (image_urls.allow_http).

Guarded as a server that fetches on a client's behalf must be: only http and https; the host must
resolve to public addresses unless private ones are allowed (no reaching the cluster's internal
services); no redirects (a redirect could lead to a private address); a total timeout; a byte
limit enforced while reading. Every failure is a RequestError naming the field (HTTP 400).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

import aiohttp

from runtime.errors import RequestError


class ImageFetcher:
    def __init__(self, timeout_s: float, max_bytes: int, allow_private: bool):
        self.timeout_s, self.max_bytes, self.allow_private = timeout_s, max_bytes, allow_private

    async def fetch(self, url: str, field: str) -> bytes:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RequestError("image URL must be http(s)://host/...", field)
        await self._check_host(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), field)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as session, \
                    session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise RequestError(f"fetching the image returned HTTP {response.status}", field)
                if (response.content_length or 0) > self.max_bytes:
                    raise RequestError(f"image is larger than {self.max_bytes} bytes", field)
                data = bytearray()
                async for chunk in response.content.iter_chunked(1 << 16):
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise RequestError(f"image is larger than {self.max_bytes} bytes", field)
                return bytes(data)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise RequestError(f"could not fetch the image: {type(e).__name__} {e}".strip(), field) from e

    async def _check_host(self, host: str, port: int, field: str) -> None:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise RequestError(f"image host {host!r} does not resolve", field) from e
        if self.allow_private:
            return
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            if not address.is_global:
                raise RequestError(f"image host {host!r} resolves to a non-public address ({address}); "
                                   "the operator has not allowed those", field)

    async def fill(self, images: list[bytes], urls: tuple[tuple[int, str, str], ...]) -> list[bytes]:
        """images with every (index, field, url) fetched in place, concurrently."""
        fetched = await asyncio.gather(*(self.fetch(url, field) for _, field, url in urls))
        out = list(images)
        for (index, _, _), data in zip(urls, fetched, strict=True):
            out[index] = data
        return out
