"""``pcache dev-s3``: the bundled SeaweedFS as a local S3 endpoint for trying the project out.

It binds 127.0.0.1 only, keeps its data and credentials in one directory (so a restart with the same
``--dir`` serves the same buckets to the same exports), prints the ``AWS_*`` exports a shell needs, and
stops cleanly on Ctrl-C or SIGTERM. Not for production: one process, no replication.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from lingcore.files import write_private
from pcache.s3server import GRPC_OFFSET, REGION, SeaweedServer, SeaweedStartError, port_free

DEFAULT_PORT = 8333  # SeaweedFS's own default S3 port


def default_dir() -> str:
    """``$XDG_DATA_HOME/pcache/dev-s3`` (or ``~/.local/share/pcache/dev-s3``)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "pcache", "dev-s3")


def credentials(data_dir: Path) -> dict[str, str]:
    """The endpoint's key pair: made once, kept owner-only in ``<dir>/credentials.json``."""
    path = data_dir / "credentials.json"
    try:
        saved = json.loads(path.read_text())
        if isinstance(saved, dict) and saved.get("access_key") and saved.get("secret_key"):
            return {"access_key": str(saved["access_key"]), "secret_key": str(saved["secret_key"])}
    except (OSError, ValueError):
        pass  # first start, or an unreadable file: make a new pair
    creds = {"access_key": "DEV" + secrets.token_hex(8).upper(), "secret_key": secrets.token_urlsafe(30)}
    data_dir.mkdir(parents=True, exist_ok=True)
    write_private(path, json.dumps(creds).encode())
    return creds


def exports(server: SeaweedServer) -> str:
    """Shell lines that point the AWS tools, s3fs and every command of this project at ``server``."""
    return "\n".join([f"export AWS_ENDPOINT_URL={server.endpoint_url}",
                      f"export AWS_ACCESS_KEY_ID={server.access_key}",
                      f"export AWS_SECRET_ACCESS_KEY={server.secret_key}",
                      f"export AWS_REGION={REGION}"])


def run(data_dir: str, port: int, buckets: list[str], stop: threading.Event | None = None) -> int:
    """Start the endpoint, create ``buckets``, print the exports, serve until a signal; return 0.

    Raises:
        OSError: the port is taken (naming it), or ``weed`` cannot be found.
        SeaweedStartError: SeaweedFS did not come up (its log's path is in the message).
    """
    root = Path(data_dir).expanduser().resolve()
    for taken in (port, port + GRPC_OFFSET):
        if not port_free(taken, reuse=True):
            raise OSError(errno.EADDRINUSE, f"127.0.0.1:{taken} is in use (dev-s3 needs --port {port} and "
                                            f"{port + GRPC_OFFSET}); pick another --port")
    creds = credentials(root)
    stop = stop or threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = SeaweedServer(root / "data", s3_port=port, access_key=creds["access_key"], secret_key=creds["secret_key"])
    try:
        try:
            server.start()
        except SeaweedStartError as exc:
            raise SeaweedStartError(f"dev-s3 on 127.0.0.1:{port} did not start (is the port taken?); "
                                    f"see {server.log_path}: {str(exc).splitlines()[0]}") from None
        existing: set[Any] = {b["Name"] for b in server.client().list_buckets().get("Buckets", [])}
        for bucket in buckets:
            if bucket not in existing:
                try:
                    server.make_bucket(bucket)
                except Exception as exc:  # botocore's ClientError: InvalidBucketName and friends
                    raise ValueError(f"cannot create bucket {bucket!r} at {server.endpoint_url}: {exc}") from None
        print(exports(server), flush=True)
        print(f"dev-s3: serving {server.endpoint_url} from {root} (buckets: {', '.join(buckets) or 'none'}); "
              "Ctrl-C stops it", file=sys.stderr, flush=True)
        stop.wait()
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("dev-s3: stopped", file=sys.stderr, flush=True)
