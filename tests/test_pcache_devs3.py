"""``pcache dev-s3``: a local S3 endpoint for users; exports that work, data kept across restarts, clean stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import s3fs

from pcache.s3server import GRPC_OFFSET, port_free


def _free_port() -> int:
    for port in range(21000, 22700, 7):
        if port_free(port) and port_free(port + GRPC_OFFSET):
            return port
    raise AssertionError("no free port pair")


def _start(data_dir: Path, port: int, *extra: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    proc = subprocess.Popen([sys.executable, "-m", "pcache.cli", "dev-s3", "--dir", str(data_dir), "--port", str(port),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    env = {}
    for _ in range(4):
        line = proc.stdout.readline()
        if not line.startswith("export "):
            proc.kill()
            raise AssertionError(f"dev-s3 printed {line!r}; stderr: {proc.communicate()[1]}")
        key, _, value = line[len("export "):].strip().partition("=")
        env[key] = value
    return proc, env


def _fs(env: dict[str, str]) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True,
                             client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"], "region_name": env["AWS_REGION"]})


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "dev-s3: stopped" in err
    return err


def test_exports_work_and_data_survives_a_restart(tmp_path: Path) -> None:
    port = _free_port()
    proc, env = _start(tmp_path / "s3", port, "--bucket", "datasets")
    try:
        assert env["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{port}"
        _fs(env).pipe_file("datasets/hello.txt", b"hello")
    finally:
        _stop(proc)
    assert oct(os.stat(tmp_path / "s3" / "credentials.json").st_mode & 0o777) == "0o600"
    proc, again = _start(tmp_path / "s3", port, "--bucket", "datasets")
    try:
        assert again == env  # same credentials: exports set once keep working
        assert _fs(again).cat_file("datasets/hello.txt") == b"hello"
    finally:
        _stop(proc)


def test_a_taken_port_is_a_one_line_error(tmp_path: Path) -> None:
    port = _free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        proc = subprocess.run([sys.executable, "-m", "pcache.cli", "dev-s3", "--dir", str(tmp_path), "--port", str(port)],
                              capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port} is in use" in lines[0]
