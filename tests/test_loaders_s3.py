"""TokenDataset over real S3 (SeaweedFS), directly and through ``pcache::``, with forked workers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from loaders import TokenDataset, write_corpus


@pytest.mark.parametrize("fmt", ["megatron", "wds"])
def test_pcache_s3_source_matches_the_local_copy(tmp_path, s3_options, bucket, fmt: str) -> None:
    rng = np.random.default_rng(7)
    docs = [rng.integers(0, 50000, size=int(rng.integers(1, 400)), dtype=np.uint16) for _ in range(400)]
    write_corpus(str(tmp_path / "local"), docs, format=fmt, shard_size="32KiB")
    write_corpus(f"s3://{bucket}/corpus", docs, format=fmt, shard_size="32KiB", storage_options=s3_options)
    options = {"s3": s3_options, "pcache": {"cache_dir": str(tmp_path / "cache")}}

    def first_batches(url: str, workers: int, **kw) -> list[torch.Tensor]:
        ds = TokenDataset([url], seq_len=64, seed=4, batch_size=4, **kw)
        loader = DataLoader(ds, batch_size=4, num_workers=workers)
        return [b["tokens"] for b in itertools.islice(loader, 10)]

    local = first_batches(str(tmp_path / "local"), 0)
    remote = first_batches(f"pcache::s3://{bucket}/corpus", 2, storage_options=options)
    direct = first_batches(f"s3://{bucket}/corpus", 0, storage_options=s3_options)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(local, remote, direct, strict=True))


def test_inspect_pcache_s3_url_with_aws_environment(tmp_path, s3_server, bucket) -> None:
    """The README's own example: ``loaders inspect pcache::s3://...`` with AWS_ENDPOINT_URL and AWS_REGION."""
    import os
    import subprocess
    import sys

    docs = [np.arange(1, 50 + i, dtype=np.uint16) for i in range(20)]
    write_corpus(f"s3://{bucket}/corpus", docs, format="megatron", storage_options=s3_server.storage_options())
    env = dict(os.environ, AWS_ENDPOINT_URL=s3_server.endpoint_url, AWS_REGION="us-east-1",
               AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
               PCACHE_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "loaders", "inspect", f"pcache::s3://{bucket}/corpus", "--json"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert '"documents": 20' in proc.stdout
