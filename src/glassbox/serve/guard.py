"""The guard: request ids, Host allow-list, API key and body size, as pure ASGI middleware.

It fails closed: every path needs the key except an explicit allow-list (OPEN_PATHS,
matched exactly after the root path is removed), so a mount, a root path or an odd
spelling of a path cannot slip past it. Without a key the server trusts only requests
addressed to a loopback name (Host allow-list): a web page in the user's browser cannot
reach it through DNS rebinding. It sits inside the CORS middleware, so its 401/403/413
answers carry CORS headers and browsers can read them.

    CORS -> guard (request id, Host, key, body size) -> FastAPI routes
"""

from __future__ import annotations

import hmac
import time
import uuid

from glassbox.serve.errors import REQUEST_ID_HEADER, APIError

# Paths served without a key: liveness for load balancers, and the API's own docs.
OPEN_PATHS = frozenset({"/health", "/docs", "/openapi.json"})

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(host_header: str) -> str:
    """'example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1' (lowercase)."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class GuardMiddleware:
    """Request ids, then the Host allow-list, the API key, and the body-size limit.

    ``api_key`` None means no key (only loopback Hosts, plus ``allowed_hosts``, are
    answered); ``allowed_hosts`` given means the Host check applies even with a key;
    ``"*"`` in it turns the Host check off. ``open_paths`` adds exact paths served
    without a key (the playground page and its assets: the page asks for the key).
    """

    def __init__(
        self,
        app,
        api_key: str | None,
        max_body_bytes: int,
        allowed_hosts: list[str] | None = None,
        open_paths: frozenset[str] = frozenset(),
    ):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.open_paths = OPEN_PATHS | open_paths  # exact paths, e.g. the playground's files
        self._key = api_key.encode() if api_key is not None else None
        hosts = [host_name(h) for h in allowed_hosts or []]
        self.check_host = (api_key is None or bool(hosts)) and "*" not in hosts
        self.allowed_hosts = LOOPBACK_HOSTS | set(hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["arrived"] = rid, time.monotonic()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != b"x-request-id"]
                message["headers"] = [*headers, (REQUEST_ID_HEADER.encode(), rid.encode())]
            await send(message)

        error = self.refuse(scope)
        if error is not None:
            return await error.response(rid)(scope, receive, send_with_id)
        body, error = await self.read_body(scope, receive)
        if error is not None:
            return await error.response(rid)(scope, receive, send_with_id)
        return await self.app(scope, replay(body, receive), send_with_id)

    def refuse(self, scope) -> APIError | None:
        """The Host or API-key problem with this request, if any."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.check_host:
            host = host_name(headers.get("host", ""))
            if host not in self.allowed_hosts:
                return APIError(
                    403,
                    f"Host {host!r} is not allowed. Without an API key this server answers "
                    "only requests addressed to localhost, 127.0.0.1 or [::1]; the operator "
                    "can add a name with --allowed-host or set an API key.",
                    "invalid_request_error",
                    None,
                    "host_not_allowed",
                )
        if self._key is None or route_path(scope) in self.open_paths:
            return None
        scheme, _, given = headers.get("authorization", "").partition(" ")
        # Constant-time compare: the time taken must not reveal how much of a guess matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._key):
            return APIError(
                401,
                "Missing or invalid API key; send 'Authorization: Bearer <key>'.",
                "invalid_request_error",
                None,
                "invalid_api_key",
            )
        return None

    async def read_body(self, scope, receive) -> tuple[bytes, APIError | None]:
        """The whole body, or a 413 as soon as it passes the limit (declared or streamed)."""
        too_big = APIError(
            413,
            f"The request body is larger than this server's limit of {self.max_body_bytes} "
            "bytes (the operator sets it with --max-body-bytes). Send a smaller request.",
            "invalid_request_error",
            None,
            "request_too_large",
        )
        for k, v in scope["headers"]:
            if k.lower() == b"content-length" and v.isdigit() and int(v) > self.max_body_bytes:
                return b"", too_big
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"", None  # the client went away; the app sees the disconnect
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_body_bytes:
                return b"", too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def route_path(scope) -> str:
    """The path the router matches: scope['path'] without the root path (if it has it)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def replay(body: bytes, receive):
    """A receive() that hands the buffered body over once, then waits for disconnect."""
    sent = False

    async def receive_again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again
