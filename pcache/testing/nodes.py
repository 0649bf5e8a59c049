"""Start ``pcache serve`` nodes as real processes on loopback (shared by tests and benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from lingcore.files import write_private


def write_token(path: str | os.PathLike[str]) -> str:
    """Write a fresh random shared secret (mode 600) and return the path."""
    write_private(path, os.urandom(32).hex().encode())
    return str(path)


class NodeProcess:
    """One ``pcache serve`` process.

    Args:
        cache_dir: The node's cache directory.
        token_file: Shared secret file.
        endpoint_url: S3 endpoint of the origin (a SeaweedFS server or a chaos proxy in front of it).
        env: Environment (must carry the origin's ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``).
        extra_args: More ``pcache serve`` flags (``--memory-bytes 0``, ...). Unless they set
            ``--metrics-listen``, the unsigned metrics port is a free loopback port (:attr:`metrics_url`),
            so nodes never compete for the default 9471.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], token_file: str, endpoint_url: str,
                 env: dict[str, str], extra_args: tuple[str, ...] = ()) -> None:
        self.cache_dir, self.token_file, self.endpoint_url, self.env = str(cache_dir), token_file, endpoint_url, env
        self.extra_args = extra_args
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.metrics_url = ""  # http://host:port/metrics, unsigned; "" when turned off

    def start(self) -> str:
        """Start the node and return its URL once it is listening."""
        metrics = () if "--metrics-listen" in self.extra_args else ("--metrics-listen", "127.0.0.1:0")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pcache.cli", "serve", "--listen", "127.0.0.1:0", "--cache-dir", self.cache_dir,
             "--token-file", self.token_file, "--endpoint-url", self.endpoint_url, *metrics, *self.extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=self.env)
        line = self.proc.stdout.readline().strip() if self.proc.stdout else ""
        if not line.startswith("READY "):
            self.proc.kill()
            raise RuntimeError(f"pcache node for {self.cache_dir} did not start (got {line!r})")
        words = line.split()
        self.url = words[1]
        self.metrics_url = next((w.removeprefix("metrics=") for w in words[2:] if w.startswith("metrics=")), "")
        return self.url

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait; return the exit code (None if it was never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL, as a lost machine."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
