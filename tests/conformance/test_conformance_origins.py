"""The conformance suite for every origin kind: each class is empty but for the ``origin`` fixture."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conformance.abstract import PCacheConformance
from conformance.origins import ChaosS3Origin, LocalOrigin, MemoryOrigin, OriginKind, S3Origin
from pcache.testing import ChaosProxy, SeaweedServer


class TestLocalOrigin(PCacheConformance):
    @pytest.fixture
    def origin(self, tmp_path: Path) -> OriginKind:
        return LocalOrigin(tmp_path / "origin")


class TestMemoryOrigin(PCacheConformance):
    @pytest.fixture
    def origin(self) -> Iterator[OriginKind]:
        kind = MemoryOrigin()
        yield kind
        kind.cleanup()


@pytest.fixture(scope="module")
def conformance_bucket(s3_server: SeaweedServer) -> Iterator[str]:
    """One bucket for the module's S3 cases (each case works under its own prefix)."""
    name = s3_server.make_bucket(f"test-bucket-conformance-{os.getpid()}")
    yield name
    try:
        s3_server.ensure_running()
        s3_server.delete_bucket(name)
    except Exception as e:  # cleanup must not mask the tests' own results
        warnings.warn(f"could not delete bucket {name}: {e!r}", stacklevel=1)


class TestS3Origin(PCacheConformance):
    @pytest.fixture
    def origin(self, s3_server: SeaweedServer, conformance_bucket: str, s3_options: dict[str, Any]) -> OriginKind:
        return S3Origin(s3_server, conformance_bucket, s3_options)


class TestChaosS3Origin(PCacheConformance):
    @pytest.fixture
    def origin(self, s3_server: SeaweedServer, conformance_bucket: str, s3_options: dict[str, Any],
               chaos_proxy: Callable[..., ChaosProxy]) -> OriginKind:
        return ChaosS3Origin(s3_server, conformance_bucket, s3_options, chaos_proxy())
