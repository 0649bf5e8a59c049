"""Shared pytest fixtures: a real SeaweedFS S3 server, fresh buckets and a fault-injecting proxy.

Also imported by ``bench/``. The SeaweedFS server is session-scoped (startup takes a few seconds);
everything per-test (buckets, proxies) is cheap.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pcache.testing import ChaosProxy, SeaweedServer

_bucket_ids = itertools.count(1)

ProxyFactory = Callable[..., ChaosProxy]
StorageOptions = dict[str, Any]


def proxy_storage_options(server: SeaweedServer, proxy: ChaosProxy) -> StorageOptions:
    """s3fs storage options that reach ``server`` through ``proxy`` (same credentials).

    Args:
        server: The SeaweedFS server behind the proxy.
        proxy: A started :class:`ChaosProxy`.

    Returns:
        A fresh storage-options dict.
    """
    return server.storage_options(endpoint_url=proxy.endpoint_url)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """One real SeaweedFS (master+volume+filer+S3) per test session, on loopback."""
    data_dir: Path = tmp_path_factory.mktemp("seaweedfs")
    server = SeaweedServer(data_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _s3_server_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """Keep the shared server up for later tests if a test stopped it (outage tests) or it crashed.

    Only acts for tests that use ``s3_server`` (directly or through other fixtures), so tests that do
    not need S3 never start SeaweedFS.
    """
    if "s3_server" not in request.fixturenames:
        yield
        return
    server: SeaweedServer = request.getfixturevalue("s3_server")
    server.ensure_running()
    yield
    server.ensure_running()


@pytest.fixture
def s3_options(s3_server: SeaweedServer) -> StorageOptions:
    """s3fs storage options (key, secret, client_kwargs with endpoint_url/region) for ``s3_server``."""
    return s3_server.storage_options()


@pytest.fixture
def bucket(s3_server: SeaweedServer) -> Iterator[str]:
    """A fresh, empty bucket named ``test-bucket-<n>``; deleted (with its contents) afterwards."""
    name = s3_server.make_bucket(f"test-bucket-{next(_bucket_ids)}")
    yield name
    try:
        s3_server.ensure_running()
        s3_server.delete_bucket(name)
    except Exception as e:  # cleanup must not mask the test's own result
        warnings.warn(f"could not delete bucket {name}: {e!r}", stacklevel=1)


@pytest.fixture
def chaos_proxy(s3_server: SeaweedServer) -> Iterator[ProxyFactory]:
    """Factory for started :class:`ChaosProxy` instances in front of ``s3_server``.

    Usage: ``proxy = chaos_proxy(fail_ratio=0.1, latency_s=0.0, seed=1)``; all keyword arguments go to
    :class:`ChaosProxy`. Every proxy is stopped at teardown.
    """
    proxies: list[ChaosProxy] = []

    def make(fail_ratio: float = 0.0, latency_s: float = 0.0, **kwargs: Any) -> ChaosProxy:
        proxy = ChaosProxy(s3_server.endpoint_url, fail_ratio=fail_ratio, latency_s=latency_s, **kwargs)
        proxies.append(proxy.start())
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def proxy_options(s3_server: SeaweedServer) -> Callable[[ChaosProxy], StorageOptions]:
    """Helper fixture: ``proxy_options(proxy)`` -> s3fs storage options pointing at that proxy."""

    def build(proxy: ChaosProxy) -> StorageOptions:
        return proxy_storage_options(s3_server, proxy)

    return build


@pytest.fixture(autouse=True)
def _release_temporary_caches(request):
    """After each test, close what this process holds for cache directories under its ``tmp_path``.

    pcache keeps one engine (fetch and publish threads), write-back manager and LMDB handle per cache
    directory for the life of the process; without this a full run piles up hundreds of threads and
    over a thousand descriptors, and every later fork copies them.
    """
    yield
    tmp = getattr(request.node, "funcargs", {}).get("tmp_path")
    if tmp is not None:
        import pcache

        pcache.release(str(tmp))
