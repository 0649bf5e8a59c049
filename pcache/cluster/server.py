"""``pcache serve``: a cache node that serves blocks to its peers.

A node owns the blocks that rendezvous placement gives it. On a miss it fetches from the origin through
its local engine, whose single-flight makes N concurrent requests for a block cost one origin GET for
the whole cluster. It shares the ``cache_dir`` format (and directory, if wanted) with local readers.
Authentication runs before routing: an unsigned request to anything but ``/healthz`` gets 401. A stock
Prometheus cannot sign, so ``/metrics`` is also served unsigned on a port of its own (``metrics_listen``,
loopback by default) that has no other route; block routes stay signed on the main port.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from lingcore.checksum import block_checksum, content_hasher
from lingcore.files import fsync_dir, unlink_quiet, write_all
from lingcore.log import get_logger
from pcache.cluster.auth import AuthError, verify_request
from pcache.cluster.metrics import render
from pcache.cluster.protocol import BLOCK_HEADER, BLOCK_PATH, CHECKSUM_HEADER, placement_key
from pcache.cluster.replica import REPLICA_PATH, node_id
from pcache.keys import ObjectRef, block_key

log = get_logger(__name__)


class NodeServer:
    """One cache node.

    Args:
        fs: The node's :class:`~pcache.fs.PCacheFileSystem` (its origin and cache directory).
        token: Shared secret for peer requests.
        host: Address to bind (127.0.0.1 unless told otherwise).
        port: Port to bind (0 picks a free one).
        metrics: ``(host, port)`` of the unsigned metrics listener (port 0 picks a free one), or None
            for none; :attr:`metrics_port` is the bound port once serving.
    """

    def __init__(self, fs: Any, token: bytes, host: str = "127.0.0.1", port: int = 0,
                 metrics: tuple[str, int] | None = None) -> None:
        self.fs, self.token, self.host, self.port = fs, token, host, port
        self.metrics_host, self.metrics_port = metrics if metrics is not None else ("", 0)
        self.metrics_app: web.Application | None = None
        if metrics is not None:
            self.metrics_app = web.Application()  # no auth middleware, and no route but /metrics
            self.metrics_app.router.add_get("/metrics", self._metrics)
        self.pool = ThreadPoolExecutor(max(4, fs.config.fetch_workers), thread_name_prefix="pcache-serve")
        self.served_bytes = 0
        self.request_errors = 0
        self.node_id = node_id(fs.config.cache_dir)
        self.app = web.Application(middlewares=[self._authenticate])
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_route("GET", BLOCK_PATH, self._block)
        self.app.router.add_route("HEAD", BLOCK_PATH, self._block)
        self.app.router.add_route("PUT", REPLICA_PATH, self._put_replica)
        self.app.router.add_route("DELETE", REPLICA_PATH, self._drop_replica)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != "/healthz":
            try:
                verify_request(self.token, request.method, request.path_qs, request.headers)
            except AuthError as exc:
                self.request_errors += 1
                return web.json_response({"error": str(exc)}, status=401)
            except Exception as exc:  # noqa: BLE001 - an unforeseen header shape is refused, never a 500
                self.request_errors += 1
                log.warning("request refused: its signature could not be checked (%s)", type(exc).__name__)
                return web.json_response({"error": "malformed signature headers"}, status=401)
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
        # Names the block served, with this node's block size: the reader checks it is the one it asked for.
        bound = {BLOCK_HEADER: placement_key(request.query["path"], ref.version, engine.block_size, index).hex()}
        if request.query.get("warm") != "1" and request.query.get("verify") != "1":
            sent = await self._send_from_disk(request, ref, index, bound)
            if sent is not None:
                return sent
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
        return web.Response(body=data, headers={CHECKSUM_HEADER: f"{block_checksum(data):016x}", **bound})

    async def _send_from_disk(self, request: web.Request, ref: ObjectRef, index: int,
                              bound: dict[str, str]) -> web.StreamResponse | None:
        """Send a disk-tier block with ``sendfile`` (no copy through Python); None if it is not on disk.

        Blocks in the memory tier, compressed blocks and misses take the general path. The block file's
        header must name the block's key (checked when it is opened), so a file copied or renamed over
        it is dropped, not sent. The checksum header is the one recorded when the block was stored; the
        reader verifies it end to end.
        """
        engine = self.fs.engine
        key = block_key(ref, index, engine.block_size)
        if key in engine.memory:
            return None
        opened = await asyncio.get_running_loop().run_in_executor(self.pool, engine.disk.open_payload, key)
        if opened is None:
            return None
        fd, offset, length, checksum = opened
        try:
            with os.fdopen(fd, "rb", closefd=False) as fobj:
                resp = web.StreamResponse(headers={CHECKSUM_HEADER: f"{checksum:016x}", **bound})
                resp.content_length = length
                await resp.prepare(request)
                assert request.transport is not None
                await asyncio.get_running_loop().sendfile(request.transport, fobj, offset, length)
                await resp.write_eof()
        finally:
            os.close(fd)
        engine._count("hits_disk")
        self.served_bytes += length
        return resp

    async def _put_replica(self, request: web.Request) -> web.Response:
        """Store a writer's staged file as a standby replica; 201 only once it is durable here."""
        q = request.query
        try:
            entry: dict[str, Any] = {
                "id": uuid.uuid4().hex,  # our own name for the file: nothing from the request becomes a path
                "source_id": q["source_id"], "source_node": q["source_node"], "url": q["url"],
                "protocol": q["protocol"], "path": q["path"], "options": json.loads(q["options"]),
                "size": int(q["size"]), "xxh3_128": q["xxh3_128"], "created": float(q["created"]),
            }
        except (KeyError, ValueError) as exc:
            raise web.HTTPBadRequest(text=f"bad replica request: {exc!r}") from None
        if entry["protocol"] != self.fs.target_protocol or entry["protocol"] in ("file", "local", "memory"):
            # Adoption writes to the entry's store with this node's rights: only to its own remote origin.
            raise web.HTTPBadRequest(text=f"replica for protocol {entry['protocol']!r} refused: this node "
                                          f"only adopts replicas for its own origin ({self.fs.target_protocol})")
        if entry["source_node"] == self.node_id:
            return web.json_response({"error": "this node shares the writer's cache_dir"}, status=409)
        journal = self.fs.writeback.journal
        tmp = os.path.join(journal.dir, f"{entry['id']}.tmp")
        loop = asyncio.get_running_loop()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        hasher, size = content_hasher(), 0
        pending: asyncio.Future[Any] | None = None  # the executor call that is using fd, if any
        try:
            async for chunk in request.content.iter_chunked(1024 * 1024):
                hasher.update(chunk)
                size += len(chunk)
                pending = loop.run_in_executor(self.pool, write_all, fd, chunk)
                await pending
            if size != entry["size"] or hasher.hexdigest() != entry["xxh3_128"]:
                raise web.HTTPBadRequest(text=f"replica of {entry['url']} arrived damaged "
                                              f"({size} of {entry['size']} bytes or a checksum mismatch)")
            pending = loop.run_in_executor(self.pool, self._publish_replica, fd, tmp, entry)
            await pending
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            log.error("replica of %s not stored: %s", entry["url"], exc, extra={"url": entry["url"]})
            return web.json_response({"error": str(exc)}, status=507 if full else 500)
        finally:
            def release(_: object = None) -> None:
                os.close(fd)
                unlink_quiet(tmp)

            if pending is not None and not pending.done():
                # Cancelled (the writer hung up) while a thread still uses fd: closing it now could let
                # that thread write into whatever file reuses the number. Close once the thread is done.
                pending.add_done_callback(release)
            else:
                release()
        return web.json_response({"node": self.node_id, "id": entry["id"]}, status=201)

    def _publish_replica(self, fd: int, tmp: str, entry: dict[str, Any]) -> None:
        journal = self.fs.writeback.journal
        os.fsync(fd)
        os.replace(tmp, journal.data_path(entry["id"]))
        fsync_dir(journal.dir)
        entry["received"] = time.time()
        for stale in journal.add_replica(entry):
            unlink_quiet(journal.data_path(stale))

    async def _drop_replica(self, request: web.Request) -> web.Response:
        source_id = request.query.get("source_id", "")
        journal = self.fs.writeback.journal
        local = await asyncio.get_running_loop().run_in_executor(self.pool, journal.drop_replica, source_id)
        if local is None:
            return web.json_response({"dropped": False}, status=404)
        unlink_quiet(journal.data_path(local))
        return web.json_response({"dropped": True})

    async def start(self) -> list[web.AppRunner]:
        """Bind the main port (and the metrics port, if any); return the runners to clean up."""
        runners = []
        for app, host, port in ((self.app, self.host, self.port), (self.metrics_app, self.metrics_host,
                                                                    self.metrics_port)):
            if app is None:
                continue
            runner = web.AppRunner(app, handle_signals=False)
            await runner.setup()
            runners.append(runner)
            try:
                await web.TCPSite(runner, host, port, shutdown_timeout=10.0).start()
            except OSError:
                for started in runners:
                    await started.cleanup()
                raise
            if app is self.app:
                self.port = runner.addresses[0][1]
                log.info("pcache node listening on http://%s:%d", self.host, self.port)
            else:
                self.metrics_port = runner.addresses[0][1]
                log.info("pcache node metrics (unsigned) on http://%s:%d/metrics", self.metrics_host,
                         self.metrics_port)
        return runners

    async def serve(self, ready: Any = None) -> None:
        """Serve until SIGTERM or SIGINT, then drain in-flight requests and stop."""
        runners = await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ready is not None:  # only now: a SIGTERM right after READY must drain, not kill
            ready(self)
        await stop.wait()
        log.info("pcache node stopping: draining in-flight requests")
        for runner in runners:
            await runner.cleanup()
        self.pool.shutdown(wait=True)
