"""Packing: one source's documents, in an epoch's order, cut into ``seq_len + 1`` token windows.

A source's token stream for epoch ``e`` is its documents in :func:`~loaders.order.document_order`,
concatenated. Window ``j`` is tokens ``[j * seq_len, j * seq_len + seq_len + 1)`` of it, so consecutive
windows share one token and ``n`` consecutive windows are one contiguous token range.

:meth:`SourceView.windows` packs such a run in one go: the documents covering the range are found by
binary search, their byte ranges are computed with array arithmetic, the pieces are joined with one
copy, and the windows are strided views of the result. Per document that costs one small Python object
(a memoryview slice), not a numpy call, which is what makes packing run near memory bandwidth.
Documents that fail to read fall back to the per-window path, which can skip them (``on_error="skip"``).
"""

from __future__ import annotations

from bisect import bisect_right
from operator import itemgetter
from typing import Any

import numpy as np

from lingcore.log import get_logger
from loaders.errors import FormatError, InvalidParameterError
from loaders.formats import Corpus
from loaders.order import document_order

log = get_logger(__name__)


class SourceView:
    """One source's documents and its per-epoch token streams (cached, two epochs at a time).

    Args:
        corpus: The opened corpus.
        index: The source's position among the dataset's sources (seeds its shuffle).
        seq_len: Tokens per training sequence.
        seed: Shuffle seed.
        shuffle: Shuffle shard order and documents within ``window``.
        window: Documents per bounded shuffle block.
    """

    def __init__(self, corpus: Corpus, index: int, seq_len: int, seed: int, shuffle: bool, window: int) -> None:
        self.corpus, self.index, self.seq_len = corpus, index, seq_len
        self.seed, self.shuffle, self.shuffle_window = seed, shuffle, window
        lengths = corpus.load_lengths()
        self.shard_docs = [len(lens) for lens in lengths]
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_docs, dtype=np.int64)])
        self._shard_starts = [int(v) for v in self.shard_starts]  # bisect on a list beats numpy for scalars
        self.lengths = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
        total = int(self.lengths.sum())
        self.windows_per_epoch = max(0, (total - 1) // seq_len)
        if self.windows_per_epoch == 0:
            raise InvalidParameterError(
                "seq_len", f"source {corpus.url} has {total} tokens: too few for one window of {seq_len + 1}")
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def stream(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, cumulative token ends) of ``epoch``."""
        cached = self._epochs.get(epoch)
        if cached is None:
            order = document_order(self.shard_docs, seed=self.seed, source=self.index, epoch=epoch,
                                   shuffle=self.shuffle, window=self.shuffle_window)
            cached = (order, np.cumsum(self.lengths[order]))
            if len(self._epochs) >= 2:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = cached
        return cached

    def windows(self, c: int, out: np.ndarray, doc_ids: np.ndarray | None, on_error: str,
                starts: list[tuple[np.ndarray, np.ndarray]] | None = None) -> int:
        """Fill ``out[i]`` with the source's window ``c + i``; return corrupt documents skipped.

        Args:
            c: The first window (counted over all epochs).
            out: ``[n, seq_len + 1]`` tokens (any integer dtype wide enough for the corpus).
            doc_ids: ``[n, seq_len + 1]`` int32: which document of its window each token belongs to; or None
                when ``starts`` is given instead.
            on_error: ``"raise"`` or ``"skip"``.
            starts: Receives ``(rows, offsets)`` int64 arrays: row ``rows[k]`` of ``out`` has a document
                starting at ``offsets[k]`` (``1 .. seq_len``; a row's own start is implied), rows ascending.
        """
        done = skipped = 0
        n = out.shape[0]
        while done < n:  # a run never crosses an epoch: each epoch has its own order
            epoch, j = divmod(c + done, self.windows_per_epoch)
            m = min(n - done, self.windows_per_epoch - j)
            try:
                flat, takes = self._run(epoch, j, m, out.shape[1])
                out[done:done + m] = _overlapping_rows(flat, m, out.shape[1], self.seq_len)
                if doc_ids is not None:
                    self._doc_ids(takes, doc_ids[done:done + m])
                if starts is not None:
                    rows, offsets = self._starts(takes)
                    starts.append((rows + done, offsets))
            except FormatError:
                if on_error != "skip":
                    raise
                ids = doc_ids if doc_ids is not None else np.empty(out.shape, np.int32)
                for i in range(done, done + m):  # slow path: finds and skips the corrupt documents
                    skipped += self.window(c + i, out[i], ids[i], on_error)
                    if starts is not None:
                        offsets = np.flatnonzero(np.diff(ids[i])) + 1
                        starts.append((np.full(offsets.size, i, np.int64), offsets.astype(np.int64)))
            done += m
        return skipped

    def run_view(self, c: int, n: int, width: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]] | None:
        """Windows ``c .. c + n`` as a read-only ``[n, width]`` view of one packed buffer, and their document
        starts (as :meth:`windows` reports them); None when they cross an epoch (use :meth:`windows`).

        The zero-copy form of :meth:`windows` for the ``cu_seqlens`` path: the packed buffer is the only copy
        made, and consecutive rows share their overlapping token. Raises :class:`FormatError` like it.
        """
        epoch, j = divmod(c, self.windows_per_epoch)
        if j + n > self.windows_per_epoch:
            return None
        flat, takes = self._run(epoch, j, n, width)
        return _overlapping_rows(flat, n, width, self.seq_len), self._starts(takes)

    def _run(self, epoch: int, j: int, m: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of windows ``j .. j + m`` of ``epoch`` (all inside it) as one contiguous range, and how many
        each covering document contributes."""
        order, ends = self.stream(epoch)
        start = j * self.seq_len
        count = (m - 1) * self.seq_len + width
        p0 = int(np.searchsorted(ends, start, side="right"))
        p1 = int(np.searchsorted(ends, start + count - 1, side="right")) + 1
        docs = order[p0:p1]
        first = start - (int(ends[p0 - 1]) if p0 else 0)
        takes = self.lengths[docs]
        takes[0] -= first
        takes[-1] -= int(ends[p1 - 1]) - (start + count)  # the last document is cut at the range's end
        lo = np.zeros(docs.size, np.int64)
        lo[0] = first
        return self._gather(docs, lo, lo + takes, count), takes

    def _doc_ids(self, takes: np.ndarray, doc_ids: np.ndarray) -> None:
        m, width = doc_ids.shape
        ids = _overlapping_rows(np.repeat(np.arange(takes.size, dtype=np.int32), takes), m, width, self.seq_len)
        np.subtract(ids, ids[:, :1], out=doc_ids)

    def _starts(self, takes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # A document starting at stream position s > 0 of the run lies in row (s - 1) // seq_len at offset
        # 1 .. seq_len (offset 0 of the next row is that row's own start). Empty documents start nothing.
        begins = np.cumsum(takes[:-1])[takes[1:] > 0]
        rows = (begins - 1) // self.seq_len
        return rows, begins - rows * self.seq_len

    def _gather(self, docs: np.ndarray, lo: np.ndarray, hi: np.ndarray, count: int) -> np.ndarray:
        """Tokens ``lo:hi`` of each document, concatenated (``count`` tokens)."""
        shard_of = np.searchsorted(self.shard_starts, docs, side="right") - 1
        local = docs - self.shard_starts[shard_of]
        first = int(shard_of[0])
        if (shard_of == first).all():
            pieces = _pieces(self.corpus.shards[first], local, lo, hi)
        else:  # gather per shard, then put the pieces back in stream order with one C-level lookup
            by_shard = np.argsort(shard_of, kind="stable")
            grouped: list[Any] = []
            for s in np.unique(shard_of).tolist():
                at = by_shard[len(grouped):len(grouped) + int(np.count_nonzero(shard_of == s))]
                grouped += _pieces(self.corpus.shards[s], local[at], lo[at], hi[at])
            where = np.empty_like(by_shard)
            where[by_shard] = np.arange(by_shard.size)
            pieces = list(itemgetter(*where.tolist())(grouped)) if where.size > 1 else grouped
        joined = b"".join(pieces)
        if len(joined) != count * self.corpus.dtype.itemsize:  # before frombuffer: it may end mid-token
            raise FormatError(self.corpus.url, f"documents {docs.tolist()} are shorter than their index says")
        return np.frombuffer(joined, dtype=self.corpus.dtype)

    def window(self, c: int, out: np.ndarray, doc_ids: np.ndarray, on_error: str) -> int:
        """Fill ``out`` with window ``c`` one document at a time; return corrupt documents skipped.

        The slow path, used when a run of windows hit a corrupt document: it skips such documents (taking
        more from the following ones) and moves into the next epoch's stream when this one runs out.
        """
        epoch, j = divmod(c, self.windows_per_epoch)
        order, ends = self.stream(epoch)
        start = j * self.seq_len
        pos = int(np.searchsorted(ends, start, side="right"))
        offset = start - (int(ends[pos - 1]) if pos else 0)
        filled, segment, skipped, unread = 0, 0, 0, 0
        need = len(out)
        while filled < need:
            if pos >= len(order):  # only after skipped documents: wrap into the next epoch's stream
                order, ends = self.stream(epoch + 1)
                epoch, pos, offset = epoch + 1, 0, 0
            if unread > len(self.lengths):  # every document of a whole epoch failed: nothing to skip to
                raise FormatError(self.corpus.url, f"no readable document left (window {c}, {skipped} skipped)")
            doc = int(order[pos])
            shard = bisect_right(self._shard_starts, doc) - 1
            local = doc - self._shard_starts[shard]
            take = min(int(self.lengths[doc]) - offset, need - filled)
            try:
                tokens = self.corpus.shards[shard].read(local, offset, offset + take)
                if len(tokens) != take:
                    raise FormatError(self.corpus.shards[shard].url, f"document {local} is shorter than its index says")
            except FormatError as exc:
                if on_error != "skip":
                    raise
                skipped, unread = skipped + 1, unread + 1
                log.warning("skipping corrupt document %d of %s: %s", local, self.corpus.shards[shard].url, exc)
                pos, offset = pos + 1, 0
                continue
            unread = 0
            out[filled:filled + take] = tokens
            doc_ids[filled:filled + take] = segment
            filled += take
            segment += 1
            pos, offset = pos + 1, 0
        return skipped


def _overlapping_rows(flat: np.ndarray, rows: int, width: int, step: int) -> np.ndarray:
    """View ``flat`` as ``rows`` rows of ``width`` starting every ``step`` items (read-only, no copy)."""
    # np.ndarray(buffer=...) instead of as_strided: the same view at a tenth of the Python overhead
    return np.ndarray((rows, width), flat.dtype, buffer=flat, strides=(step * flat.itemsize, flat.itemsize))


def _pieces(shard: Any, docs: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> list[Any]:
    """Buffers of tokens ``lo:hi`` of each of ``docs`` in ``shard`` (its ``gather`` fast path if it has one)."""
    gather = getattr(shard, "gather", None)
    if gather is not None:
        return list(gather(docs, lo, hi))
    return [shard.read(int(d), int(a), int(b)) for d, a, b in zip(docs, lo, hi, strict=True)]
