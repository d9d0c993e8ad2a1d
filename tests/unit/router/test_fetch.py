"""http(s) image URLs against a real local HTTP server: fetched when allowed, refused for private
addresses, oversized bodies, redirects and errors, each as a RequestError naming the field."""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from runtime.errors import RequestError
from runtime.requests import RequestLimits, parse_chat_request
from runtime.router.fetch import ImageFetcher

IMAGE = b"\x89PNG fake image bytes" * 10


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/image.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(IMAGE)))
            self.end_headers()
            self.wfile.write(IMAGE)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/image.png")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _fetch(url: str, **kw) -> bytes:
    fetcher = ImageFetcher(kw.get("timeout_s", 5.0), kw.get("max_bytes", 10_000), kw.get("allow_private", True))
    return asyncio.run(fetcher.fetch(url, "messages[0].content[0].image_url.url"))


def test_fetches_when_private_addresses_are_allowed(server) -> None:
    assert _fetch(f"{server}/image.png") == IMAGE


@pytest.mark.parametrize("path,kw,words", [
    ("/image.png", {"allow_private": False}, "non-public"),
    ("/image.png", {"max_bytes": 50}, "larger than"),
    ("/redirect", {}, "HTTP 302"),
    ("/missing", {}, "HTTP 404"),
])
def test_refusals_name_the_field(server, path, kw, words) -> None:
    with pytest.raises(RequestError) as e:
        _fetch(f"{server}{path}", **kw)
    assert words in str(e.value) and e.value.field == "messages[0].content[0].image_url.url"


def test_unreachable_and_non_http_urls_are_refused() -> None:
    with pytest.raises(RequestError, match="could not fetch"):
        _fetch("http://127.0.0.1:9/image.png", timeout_s=2)
    with pytest.raises(RequestError, match="http"):
        _fetch("ftp://example.com/image.png")


def test_parser_leaves_urls_to_fetch_only_when_allowed(server) -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{server}/a"}}]}]}
    with pytest.raises(RequestError, match="disabled"):
        parse_chat_request(body)
    chat = parse_chat_request(body, limits=RequestLimits(allow_http_images=True))
    assert chat.images == [b""] and chat.image_urls == ((0, "messages[0].content[0].image_url.url", f"{server}/a"),)
