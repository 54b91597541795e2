"""The errors Ray Serve's proxy answers itself, in OpenAI's JSON shape like the app's own.

The proxy answers some requests without a replica, in plain text: 429 when every replica is full
and its queue too (back-pressure), 503 when no replica is up, 404 before the application is
deployed. OpenAI clients read `error.message`, `error.type` and `error.code` from a JSON body; this
middleware gives them that. Ray loads it into every proxy from the environment:

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deploy.proxy_errors:middlewares

(deploy/ray_serve.py sets it for the Ray instance it starts.) Kept free of the server's imports:
the proxies load it, not the replicas.
"""

from __future__ import annotations

import json

from starlette.middleware import Middleware

KINDS = {404: ("not_found_error", "not_found"), 429: ("rate_limit_error", "queue_full"),
         503: ("server_error", "unavailable")}


def middlewares() -> list[Middleware]:
    return [Middleware(OpenAIErrorShape)]


def error_body(status: int, text: str) -> bytes:
    kind, code = KINDS.get(status, ("server_error", "proxy_error"))
    message = text.strip() or f"HTTP {status}"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


class OpenAIErrorShape:
    """Rewrites plain-text error responses (status >= 400) into OpenAI's error JSON, keeping the
    status and the other headers (Retry-After); every other response passes untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held, text = None, b""

        async def send_shaped(message):
            nonlocal held, text
            if message["type"] == "http.response.start" and _plain_error(message):
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                return await send(message)
            text += message.get("body", b"")
            if not message.get("more_body", False):
                body = error_body(held["status"], text.decode("utf-8", "replace"))
                await send({"type": "http.response.start", "status": held["status"], "headers": _json_headers(held, body)})
                await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, send_shaped)


def _plain_error(start: dict) -> bool:
    content_type = dict(start.get("headers", [])).get(b"content-type", b"text/plain")
    return start["status"] >= 400 and content_type.split(b";")[0].strip() == b"text/plain"


def _json_headers(start: dict, body: bytes) -> list[tuple[bytes, bytes]]:
    kept = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
    return [*kept, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
