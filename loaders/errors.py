"""Typed errors raised by loaders.

Each subclasses the built-in exception a caller would already catch (``ValueError`` for bad content or
parameters, ``FileNotFoundError`` for missing data, ``ImportError`` for a missing optional package), and
its message names the file, shard member or parameter involved, so a failing multi-terabyte job points
at the one bad object instead of a traceback inside numpy.
"""

from __future__ import annotations

from typing import Any


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class _Picklable:
    """Pickles an error by its message and attributes, not by its ``__init__`` signature.

    The default pickling calls ``cls(*args)``, which fails for ``__init__(url, message)``; in a
    multiprocessing pool that failure hangs the parent instead of re-raising the error.
    """

    args: tuple[Any, ...]

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), self.args, dict(self.__dict__))


class InvalidParameterError(_Picklable, ValueError):
    """A caller passed an invalid argument; the message names the parameter."""

    def __init__(self, parameter: str, message: str) -> None:
        self.parameter = parameter
        super().__init__(f"invalid {parameter}: {message}")


class FormatError(_Picklable, ValueError):
    """Base of every content error in a corpus file; ``url`` names the file (or shard)."""

    def __init__(self, url: str, message: str) -> None:
        self.url = url
        self.detail = message
        super().__init__(f"{url}: {message}")


class CorruptIndexError(FormatError):
    """An index (Megatron ``.idx``, WebDataset member table, ``index.json``) is malformed."""


class TruncatedIndexError(CorruptIndexError):
    """An index is shorter than its own header says (a partial upload or copy)."""


class LegacyFormatError(CorruptIndexError):
    """A Megatron ``.idx`` in the legacy ``TNTIDX`` (pre-mmap, lazy/cached) format."""

    def __init__(self, url: str) -> None:
        super().__init__(
            url,
            "legacy Megatron 'TNTIDX' index; only the MMIDIDX v1 format is supported "
            "(re-run Megatron's preprocess_data.py, or `loaders pack`, to convert)",
        )


class UnsupportedVersionError(CorruptIndexError):
    """A known magic with a version this code does not read."""

    def __init__(self, url: str, version: int, supported: int = 1) -> None:
        self.version = version
        super().__init__(url, f"unsupported index version {version} (expected {supported})")


class UnknownDtypeError(CorruptIndexError):
    """A dtype code or descriptor that is not a supported token type."""


class TruncatedDataError(FormatError):
    """A data file (``.bin``, tar, ``data.mdb``) is shorter than its index says."""


class EmptyShardError(FormatError):
    """A shard with no documents (or a zero-byte file); writers never produce one."""


class CorruptMemberError(FormatError):
    """One document inside a shard is unreadable (bad tar header checksum, bad ``.npy``, bad value).

    Attributes:
        member: The tar member name or LMDB key of the bad document.
    """

    def __init__(self, url: str, member: str, message: str) -> None:
        self.member = member
        super().__init__(url, f"member {member!r}: {message}")


class ChecksumMismatchError(FormatError):
    """A file's xxh3-128 content hash differs from the one recorded in ``index.json``."""

    def __init__(self, url: str, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(url, f"xxh3-128 mismatch: index.json records {expected}, file hashes to {actual}")


class CorpusNotFoundError(_Picklable, FileNotFoundError):
    """No corpus (``index.json``, Megatron prefix, ``.idx/.bin`` pairs, tar or LMDB shards) at a URL."""

    def __init__(self, url: str, detail: str = "") -> None:
        self.url = url
        msg = f"no corpus found at {url}: expected index.json, a Megatron prefix (NAME.idx + NAME.bin), " \
              "a directory of .idx/.bin pairs, .tar shards or .lmdb shards"
        super().__init__(msg + (f" ({detail})" if detail else ""))


class MissingDependencyError(_Picklable, ImportError):
    """An optional package needed for a feature is not installed."""

    def __init__(self, package: str, feature: str) -> None:
        self.package = package
        super().__init__(f"{feature} needs the {package!r} package: pip install {package}")
