"""The README's quick start, run as written: every ``sh`` block between the walkthrough markers, in order,
in one bash shell, so the README cannot drift from what works.

What the test changes, and only this: ``source .venv/bin/activate`` becomes putting this interpreter's
``bin`` first on ``PATH`` (the tests may run from a venv elsewhere); ``mktemp -d`` makes its directory
under pytest's temp dir (``TMPDIR``); dev-s3 gets a free port through ``PCACHE_DEV_S3_PORT``. Blocks tagged
``sh fuse`` are skipped, with a warning saying so, only where ``/dev/fuse`` is missing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from pcache.s3server import GRPC_OFFSET, port_free

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- walkthrough:start", "<!-- walkthrough:end -->"
FENCE = re.compile(r"^```(sh(?: [\w-]+)?)\n(.*?)^```\n", re.M | re.S)
ACTIVATE = "source .venv/bin/activate"


def walkthrough_blocks(readme: str) -> list[tuple[str, str]]:
    """``(tag, body)`` of each ``sh`` / ``sh fuse`` block between the markers, in order."""
    start = readme.index(START)
    section = readme[start:readme.index(END, start)]
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(section)]


def _free_port() -> int:
    for port in range(23000, 24700, 11):
        if port_free(port) and port_free(port + GRPC_OFFSET):
            return port
    raise AssertionError("no free port pair")


def _script(blocks: list[tuple[str, str]], fuse: bool) -> str:
    # On any exit, stop what the walkthrough started in the background and unmount, so a failing step
    # leaves no server or mount behind.
    lines = ["set -eo pipefail",
             "trap 'rc=$?; set +e; mountpoint -q mnt 2>/dev/null && fusefs umount mnt; "
             "kill $(jobs -p) 2>/dev/null; wait; exit $rc' EXIT"]
    for tag, body in blocks:
        if tag == "sh fuse" and not fuse:
            continue
        lines.append(f"echo \"### README block ({tag}) $(date +%T)\" >&2")
        lines.append(body.replace(ACTIVATE, 'export PATH="$WALKTHROUGH_BIN:$PATH"'))
    return "\n".join(lines) + "\n"


def test_readme_blocks_are_found() -> None:
    blocks = walkthrough_blocks((ROOT / "README.md").read_text())
    tags = [tag for tag, _ in blocks]
    assert tags.count("sh") >= 6 and tags.count("sh fuse") == 2
    assert ACTIVATE in blocks[0][1], "the walkthrough starts from the venv, as a new user does"
    text = "".join(body for _, body in blocks)
    for step in ("pcache dev-s3", "loaders pack", "--tokenizer tokenizer.json", "loaders inspect", "fusefs mount",
                 "ling-train", "--resume", "kill $TRAIN", "babel-sync once"):
        assert step in text, step


@pytest.mark.timeout(600)
def test_readme_walkthrough_runs(tmp_path: Path) -> None:
    fuse = os.path.exists("/dev/fuse")
    if not fuse:
        warnings.warn("README walkthrough: /dev/fuse is missing, the `sh fuse` blocks (fusefs mount/umount) "
                      "are skipped and training reads pcache::s3:// instead", stacklevel=1)
    script = _script(walkthrough_blocks((ROOT / "README.md").read_text()), fuse)
    (tmp_path / "walkthrough.sh").write_text(script)
    env = {**os.environ, "TMPDIR": str(tmp_path), "PCACHE_DEV_S3_PORT": str(_free_port()),
           "WALKTHROUGH_BIN": os.path.dirname(sys.executable), "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"),
           "XDG_DATA_HOME": str(tmp_path / "xdg-data"), "PYTHONPATH": str(ROOT)}
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_PROFILE"):
        env.pop(key, None)  # only what dev-s3 exports
    proc = subprocess.Popen(["bash", str(tmp_path / "walkthrough.sh")], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # bash's EXIT trap stops dev-s3 and unmounts
        output, _ = proc.communicate(timeout=60)
        pytest.fail(f"README walkthrough did not finish in 480 s:\n{output[-6000:]}")
    finally:
        for mnt in tmp_path.glob("tmp.*/mnt"):
            if os.path.ismount(mnt):
                subprocess.run([sys.executable, "-m", "fusefs.cli", "umount", str(mnt)], timeout=60, check=False)
    assert proc.returncode == 0, f"README walkthrough failed (exit {proc.returncode}):\n{output[-8000:]}"
    # What each step promises, from its own output.
    assert "wrote " in output and "uint16" in output                       # loaders pack
    assert "verified     OK" in output                                    # loaders inspect
    assert "resumed from committed step" in output                        # ling-train --resume
    assert "ling-train stopped (exit" in output and re.search(r"done: step 40, last loss", output)
    assert '"errors": []' in output or '"errors":[]' in output or "in sync" in output.lower()  # babel-sync
    assert "dev-s3: stopped" in output and "Traceback (most recent call last)" not in output.split(
        "ling-train stopped")[-1]
