"""The embedded S3 endpoint: a real SeaweedFS on loopback, for `make demo`, tests, benchmarks and users
(`pcache dev-s3`).

SeaweedFS is used instead of a fake S3 (moto etc.) because pcache's correctness depends on real HTTP
semantics: SigV4 auth, ranged GETs, multipart uploads, ETags and server-side failures.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
import weakref
from pathlib import Path
from typing import Any

import botocore.config
import botocore.session

from lingcore.files import write_private
from pcache.weed import GRPC_OFFSET, SeaweedStartError, find_weed_binary, pick_ports, port_free

__all__ = ["GRPC_OFFSET", "REGION", "SeaweedServer", "SeaweedStartError", "find_weed_binary", "port_free"]

REGION = "us-east-1"
_ROLES = ("master", "volume", "filer", "s3")
# Servers to stop at interpreter exit, so an interrupted test run does not leave weed running.
_live: weakref.WeakSet[SeaweedServer] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for srv in list(_live):
        srv.stop()


# Loaded via `weed -config_dir`: one volume per collection instead of 7 (every bucket is its own
# collection, so the default would create 7 volume files per test bucket), and no periodic
# maintenance scripts competing for the 2 CPU cores.
_MASTER_TOML = """\
[master.maintenance]
scripts = ""
sleep_minutes = 1000

[master.volume_growth]
copy_1 = 1
"""


class SeaweedServer:
    """A single-process SeaweedFS (master + volume + filer + S3 gateway) on loopback.

    Ports are chosen once and reused by :meth:`restart`, so clients (and proxies) configured
    before an outage reconnect to the same endpoint afterwards.

    Args:
        data_dir: Directory for volumes, filer metadata, configs and ``weed.log``. Created if missing.
        volume_size_limit_mb: Size at which the master stops writing to a volume.
        start_timeout_s: How long :meth:`start` waits for S3 to answer signed requests.
        stop_grace_s: How long :meth:`stop` waits after SIGTERM before SIGKILL.
        weed_binary: Path to ``weed``; located with :func:`find_weed_binary` if omitted.
        access_key: S3 access key id (default: generated).
        secret_key: S3 secret key (default: generated).
        s3_port: Fixed S3 port (default: a free one); its gRPC port is ``s3_port + 10000``.

    Attributes:
        access_key: Generated S3 access key id.
        secret_key: Generated S3 secret key.
        ports: Mapping role (``master``, ``volume``, ``filer``, ``s3``) -> HTTP port.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        volume_size_limit_mb: int = 256,
        start_timeout_s: float = 60.0,
        stop_grace_s: float = 1.0,
        weed_binary: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        s3_port: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.volume_size_limit_mb = volume_size_limit_mb
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self.weed_binary = weed_binary or find_weed_binary()
        self.access_key = access_key or "PCT" + secrets.token_hex(8).upper()
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        if s3_port is None:
            self.ports: dict[str, int] = dict(zip(_ROLES, pick_ports(len(_ROLES)), strict=True))
        else:
            others = pick_ports(len(_ROLES) - 1, reserved=(s3_port,))
            self.ports = {**dict(zip(_ROLES[:-1], others, strict=True)), "s3": s3_port}
        self.log_path = self.data_dir / "weed.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    # ------------------------------------------------------------------ properties
    @property
    def endpoint_url(self) -> str:
        """S3 endpoint, e.g. ``http://127.0.0.1:12345``."""
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def running(self) -> bool:
        """True while the weed process is alive (it may not be serving yet)."""
        return self._proc is not None and self._proc.poll() is None

    def storage_options(self, endpoint_url: str | None = None) -> dict[str, Any]:
        """s3fs/fsspec storage options for this server.

        Args:
            endpoint_url: Override the endpoint, e.g. a :class:`~pcache.testing.ChaosProxy` URL in
                front of this server; credentials stay the same.

        Returns:
            A fresh dict suitable for ``s3fs.S3FileSystem(**opts)``.
        """
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": endpoint_url or self.endpoint_url, "region_name": REGION},
            # Path-style: loopback endpoints cannot do virtual-hosted buckets, and path-style keeps
            # request paths predictable ("/bucket/key") for ChaosProxy counters.
            "config_kwargs": {"s3": {"addressing_style": "path"}},
        }

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> SeaweedServer:
        """Start weed and block until S3 serves signed requests (including a write).

        Returns:
            ``self``, for chaining.

        Raises:
            SeaweedStartError: if the process exits or S3 is not ready within ``start_timeout_s``.
        """
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_configs()
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== pcache.s3server: starting weed at {time.ctime()} ====\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._command(),
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own process group, so stop() can signal weed and anything it spawns at once.
                start_new_session=True,
            )
        self._client = None
        _live.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate the weed process group: SIGTERM, then SIGKILL after ``stop_grace_s``.

        SeaweedFS's graceful filer shutdown waits up to 15 s for gRPC streams, far too slow for
        tests; data is already in the OS page cache (volume files, filer leveldb log), so the
        SIGKILL fallback does not lose acknowledged writes.
        """
        proc, self._proc = self._proc, None
        self._client = None
        if proc is None:
            return
        _live.discard(self)
        # Only signal the group while its leader is unreaped: afterwards the pgid could be reused.
        if proc.poll() is None:
            self._signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=30)
        self._remove_sockets()

    def restart(self) -> SeaweedServer:
        """Stop and start again on the same data dir and ports (simulates an outage + recovery).

        Returns:
            ``self``.
        """
        self.stop()
        return self.start()

    def ensure_running(self) -> SeaweedServer:
        """Start the server if a test left it stopped or it crashed.

        Returns:
            ``self``.
        """
        if not self.running:
            self.stop()  # reap a crashed process and clean its sockets
            self.start()
        return self

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"SeaweedServer({self.endpoint_url}, {state}, data_dir={str(self.data_dir)!r})"

    # ------------------------------------------------------------------ S3 helpers
    def client(self) -> Any:
        """A cached synchronous botocore S3 client with admin credentials."""
        if self._client is None:
            self._client = self._make_client(attempts=4, timeout_s=30.0)
        return self._client

    def make_bucket(self, name: str) -> str:
        """Create a bucket (SeaweedFS rejects names shorter than 3 chars; prefer ``test-bucket-N``).

        Args:
            name: Bucket name.

        Returns:
            The bucket name.
        """
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket and all its objects.

        SeaweedFS deletes non-empty buckets recursively (``-s3.allowDeleteBucketNotEmpty`` defaults
        to true) and drops the bucket's collection volumes, so this is one cheap call.

        Args:
            name: Bucket name.
        """
        self.client().delete_bucket(Bucket=name)

    def log_tail(self, max_bytes: int = 4000) -> str:
        """Last ``max_bytes`` of ``weed.log`` (for error messages)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_bytes))
                return f.read().decode("utf-8", "replace")
        except OSError as e:
            return f"<no log: {e}>"

    # ------------------------------------------------------------------ internals
    def _command(self) -> list[str]:
        p = self.ports
        d = str(self.data_dir)
        cmd = [
            self.weed_binary,
            # Global (logging/config) options must precede the sub-command.
            "-logtostderr",  # glog otherwise writes files to /tmp; stderr is redirected to weed.log
            "-v=0",
            f"-config_dir={d}",  # picks up our master.toml
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={d}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master'] + GRPC_OFFSET}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume'] + GRPC_OFFSET}",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer'] + GRPC_OFFSET}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3'] + GRPC_OFFSET}",
            f"-s3.config={self.data_dir / 's3.json'}",
            # Extra listeners with fixed default ports would collide between parallel servers.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # A single master resuming its raft log waits ~12 s for an election before it leads;
            # topology, volume ids and the file-id sequence are rebuilt from volume heartbeats anyway.
            "-master.resumeState=false",
            "-master.peers=none",
            "-master.telemetry=false",  # no phoning home (and no network in CI)
            # Small volumes + auto volume count (free space / size) instead of the default cap of 8
            # volumes, which one-collection-per-bucket tests would exhaust quickly.
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",  # default waits 10 s on shutdown
        ]
        # Unix sockets default to /tmp/seaweedfs-<role>-<port>.sock; keep them private when the
        # path fits the 108-byte sun_path limit.
        if len(d) < 80:
            cmd += [f"-filer.localSocket={d}/filer.sock", f"-s3.localSocket={d}/s3.sock"]
        return cmd

    def _write_configs(self) -> None:
        ident = {
            "identities": [
                {
                    "name": "pcache-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        write_private(self.data_dir / "s3.json", json.dumps(ident, indent=2).encode())
        (self.data_dir / "master.toml").write_text(_MASTER_TOML)

    def _make_client(self, *, attempts: int, timeout_s: float) -> Any:
        session = botocore.session.Session()
        config = botocore.config.Config(
            region_name=REGION,
            s3={"addressing_style": "path"},
            retries={"total_max_attempts": attempts, "mode": "standard"},
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
        )
        return session.create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=config,
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        client = self._make_client(attempts=1, timeout_s=5.0)  # _wait_ready loops itself
        probe = f"pcache-ready-probe-{secrets.token_hex(4)}"
        last_err: BaseException | None = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise SeaweedStartError(
                    f"weed exited with code {code} during startup; log tail ({self.log_path}):\n"
                    + self.log_tail()
                )
            try:
                # A write, not just list_buckets: S3 answers before the volume server has
                # registered with the master, and early writes would then fail in tests.
                client.list_buckets()
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket=probe)  # may exist from an earlier, failed iteration
                client.put_object(Bucket=probe, Key="probe", Body=b"ok")
                client.delete_bucket(Bucket=probe)
                return
            except Exception as e:  # anything means "not ready yet"
                last_err = e
                time.sleep(0.2)
        raise SeaweedStartError(
            f"SeaweedFS S3 at {self.endpoint_url} not ready after {self.start_timeout_s:g}s "
            f"(last error: {last_err!r}); log tail ({self.log_path}):\n{self.log_tail()}"
        )

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def _remove_sockets(self) -> None:
        # weed leaves its gRPC unix sockets behind in /tmp when killed; they are named by our
        # (exclusively owned) ports, so removing them after the process is gone is safe.
        names = [f"seaweedfs-{r}-grpc-{self.ports[r] + GRPC_OFFSET}.sock" for r in _ROLES]
        names += [f"seaweedfs-s3-{self.ports['s3']}.sock", f"seaweedfs-filer-{self.ports['filer']}.sock"]
        paths = [Path("/tmp") / n for n in names] + [self.data_dir / "filer.sock", self.data_dir / "s3.sock"]
        for path in paths:
            with contextlib.suppress(OSError):
                if path.is_socket():
                    path.unlink()
