"""A 5xx from the origin is never an answer: not "not found", not "empty", and never remembered as one.

Real SeaweedFS behind the chaos proxy, which answers exactly the n-th listing (or HEAD) request an
operation makes with 503, for every n the operation reaches. Once: the retry must give the right answer.
From then on: the operation must raise :class:`OriginUnavailableError` (or, where it can do
without that request, still give the right answer). Either way the metadata plane must
not have remembered anything wrong (the same call, without faults, gives the right answer).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import fsspec
import pytest
import s3fs

from lingcore.errors import OriginUnavailableError
from pcache import PCacheFileSystem

NOT_FOUND = "FileNotFoundError"


def _outcome(op: Callable[[], Any]) -> Any:
    """The answer of ``op``, with "not found" as a value (an outage propagates)."""
    try:
        return op()
    except FileNotFoundError:
        return NOT_FOUND


def _cases(fs: PCacheFileSystem, root: str) -> list[tuple[str, Callable[[], Any], Any]]:
    """(name, operation, right answer) for the tree put by the test."""
    a, b, c, top, sub, d = (f"{root}/{n}" for n in ("dir/a.bin", "dir/b.txt", "dir/sub/c.bin", "top.bin",
                                                     "dir/sub", "dir"))
    missing = f"{root}/dir/missing.bin"
    return [
        ("ls dir", lambda: sorted(fs.ls(d, detail=False)), [a, b, sub]),
        ("ls file", lambda: fs.ls(a, detail=False), [a]),  # s3fs lists the parent to list a file
        ("ls missing", lambda: fs.ls(missing, detail=False), NOT_FOUND),
        ("find", lambda: fs.find(root), [a, b, c, top]),
        ("find maxdepth", lambda: fs.find(root, maxdepth=2, withdirs=True), [root, d, a, b, sub, top]),
        ("find file", lambda: fs.find(a), [a]),
        ("glob one level", lambda: fs.glob(f"{d}/*.*"), [a, b]),
        ("glob recursive", lambda: fs.glob(f"{root}/**/*.bin"), [a, c, top]),
        ("glob no magic", lambda: fs.glob(b), [b]),
        ("exists file", lambda: fs.exists(a), True),
        ("exists dir", lambda: fs.exists(d), True),
        ("exists missing", lambda: fs.exists(missing), False),
        ("isdir isfile", lambda: (fs.isdir(d), fs.isfile(a), fs.isdir(a), fs.isfile(missing)),
         (True, True, False, False)),
        ("info file", lambda: {k: v for k, v in fs.info(b).items() if k in ("size", "type")},
         {"size": 13, "type": "file"}),
        ("info dir", lambda: fs.info(d)["type"], "directory"),
        ("info missing", lambda: fs.info(missing), NOT_FOUND),
    ]


@pytest.mark.parametrize(("method", "query"), [("GET", "list-type"), ("HEAD", None)], ids=["listing", "head"])
def test_a_5xx_is_never_not_found_or_empty(tmp_path, s3_server, s3_options, bucket, chaos_proxy, method: str,
                                           query: str | None) -> None:
    root = f"{bucket}/t"
    direct = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **s3_options)
    for rel, data in (("dir/a.bin", b"a" * 1000), ("dir/b.txt", b"hello pcache\n"), ("dir/sub/c.bin", b"c"),
                      ("top.bin", b"t" * 10)):
        direct.pipe_file(f"{root}/{rel}", data)
    proxy = chaos_proxy()
    # Answers are remembered for an hour: a wrong one would show in the repeat call below.
    fs = fsspec.filesystem("pcache", target_protocol="s3",
                           target_options=s3_server.storage_options(endpoint_url=proxy.endpoint_url),
                           cache_dir=str(tmp_path), skip_instance_cache=True, metadata_ttl=3600,
                           retry_attempts=2, retry_base_delay=0.001)
    reached = raised = 0
    for name, op, want in _cases(fs, root):
        fs.origin.metadata.clear()
        assert _outcome(op) == want, name
        for n in itertools.count():
            fs.origin.metadata.clear()
            fault = proxy.fail(method, query=query, skip=n, times=1)
            got = _outcome(op)
            fault.cancel()
            assert got == want, f"{name}: one 503 on {method} #{n + 1} gave {got!r}"
            assert _outcome(op) == want, f"{name}: remembered a wrong answer after a 503 on {method} #{n + 1}"
            if not fault.failed:
                break  # the operation makes fewer than n + 1 such requests
            reached = max(reached, n + 1)
            fs.origin.metadata.clear()
            fault = proxy.fail(method, query=query, skip=n, times=None)
            try:
                got = _outcome(op)
            except OriginUnavailableError as exc:  # after its retries, naming the URL
                assert "s3://" in str(exc), exc
                raised += 1
            else:  # the operation could do without the failing request (s3fs lists a file's parent)
                assert got == want, f"{name}: 503s from {method} #{n + 1} on gave {got!r}"
            finally:
                fault.cancel()
            assert _outcome(op) == want, f"{name}: remembered a wrong answer after an outage of {method} #{n + 1}"
    # Else the faults missed their mark, and this test would test little.
    assert reached >= 2 and raised >= len(_cases(fs, root)) - 3, (reached, raised)
