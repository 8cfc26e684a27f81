"""Request body cap, enforced before any parsing (a huge matrix is refused, not read)."""

from __future__ import annotations

import json
from typing import Any

from service.problems import problem


class BodyLimitMiddleware:
    """Pure ASGI: 413 problem+json when the body (declared or streamed) exceeds ``max_bytes``."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send, int(declared))
            return
        # read the body up to the cap, then replay it to the app
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, send, None)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict[str, Any], send: Any, declared: int | None) -> None:
        got = f"{declared} bytes" if declared is not None else "more"
        doc = problem(413, "body-too-large", "Content too large",
                      f"the request body has {got}; this server takes at most {self.max_bytes} bytes "
                      "(GEOSHARE_MAX_BODY_BYTES); send a smaller problem (fewer layers) or raise the cap",
                      instance=scope.get("path"))
        data = json.dumps(doc).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/problem+json"),
                                (b"content-length", str(len(data)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": data})
