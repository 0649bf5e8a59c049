"""``pcache serve``: a cache node that serves blocks to its peers.

A node owns the blocks that rendezvous placement gives it. On a miss it fetches from the origin through
its local engine, whose single-flight makes N concurrent requests for a block cost one origin GET for
the whole cluster. It shares the ``cache_dir`` format (and directory, if wanted) with local readers.
Authentication runs before routing: an unsigned request to anything but ``/healthz`` gets 401.
"""

from __future__ import annotations

import asyncio
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from pcache._util.checksum import block_checksum
from pcache._util.log import get_logger
from pcache.cluster.auth import AuthError, verify_request
from pcache.cluster.metrics import render
from pcache.cluster.protocol import BLOCK_PATH, CHECKSUM_HEADER
from pcache.engine import ObjectRef

log = get_logger(__name__)


class NodeServer:
    """One cache node.

    Args:
        fs: The node's :class:`~pcache.fs.PCacheFileSystem` (its origin and cache directory).
        token: Shared secret for peer requests.
        host: Address to bind (127.0.0.1 unless told otherwise).
        port: Port to bind (0 picks a free one).
    """

    def __init__(self, fs: Any, token: bytes, host: str = "127.0.0.1", port: int = 0) -> None:
        self.fs, self.token, self.host, self.port = fs, token, host, port
        self.pool = ThreadPoolExecutor(max(4, fs.config.fetch_workers), thread_name_prefix="pcache-serve")
        self.served_bytes = 0
        self.request_errors = 0
        self.app = web.Application(middlewares=[self._authenticate])
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_route("GET", BLOCK_PATH, self._block)
        self.app.router.add_route("HEAD", BLOCK_PATH, self._block)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != "/healthz":
            try:
                verify_request(self.token, request.method, request.path_qs, request.headers)
            except AuthError as exc:
                self.request_errors += 1
                return web.json_response({"error": str(exc)}, status=401)
        return await handler(request)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.get_running_loop().run_in_executor(self.pool, render, self)
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    def _ref(self, request: web.Request) -> tuple[ObjectRef, str, int]:
        q = request.query
        try:
            path, version, size, index = q["path"], q["version"], int(q["size"]), int(q["index"])
        except (KeyError, ValueError) as exc:
            raise web.HTTPBadRequest(text=f"bad block request: {exc!r}") from None
        if size < 0 or index < 0 or index * self.fs.config.block_size >= max(size, 1):
            raise web.HTTPBadRequest(text="block index outside the object")
        target = self.fs._target_path(path)
        ref = ObjectRef(url=f"{self.fs.origin.identity}{self.fs.origin.url(target)}", version=version, size=size)
        return ref, target, index

    async def _block(self, request: web.Request) -> web.StreamResponse:
        ref, target, index = self._ref(request)
        engine = self.fs.engine
        if request.method == "HEAD":
            present = engine.contains(ref, index)
            return web.Response(status=200 if present else 404)
        fetch = self.fs.origin.fetcher(target, ref.version)
        loop = asyncio.get_running_loop()
        try:
            data = await loop.run_in_executor(self.pool, engine.get_block, ref, index, fetch)
        except FileNotFoundError as exc:
            return web.json_response({"error": str(exc)}, status=404)
        except Exception as exc:  # noqa: BLE001 - the peer falls back to the next owner or the origin
            self.request_errors += 1
            log.warning("block %s[%d] failed: %s", target, index, exc, extra={"url": target})
            return web.json_response({"error": str(exc)}, status=502)
        if request.query.get("warm") == "1":
            return web.Response(status=204)  # cluster warm: the owner keeps the block, nothing travels back
        self.served_bytes += len(data)
        return web.Response(body=data, headers={CHECKSUM_HEADER: f"{block_checksum(data):016x}"})

    async def serve(self, ready: Any = None) -> None:
        """Serve until SIGTERM or SIGINT, then drain in-flight requests and stop."""
        runner = web.AppRunner(self.app, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, shutdown_timeout=10.0)
        await site.start()
        self.port = runner.addresses[0][1]
        log.info("pcache node listening on http://%s:%d", self.host, self.port)
        if ready is not None:
            ready(self)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("pcache node stopping: draining in-flight requests")
        await runner.cleanup()
        self.pool.shutdown(wait=True)
