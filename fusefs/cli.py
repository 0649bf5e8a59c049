"""fusefs: mount any fsspec URL through pcache (read-only, or --writable for new files), and unmount it.

  fusefs mount SOURCE_URL MOUNTPOINT [options]   s3://bucket/prefix, file:///path, ... (read-only)
  fusefs mount --writable SOURCE_URL MOUNTPOINT  new files written through pcache write-back
  fusefs commit MOUNTPOINT/DIR                   wait until DIR is at the origin, write DIR/_COMMITTED
  fusefs flush MOUNTPOINT[/PATH]                 wait until PATH is at the origin
  fusefs umount MOUNTPOINT                       also cleans up a stale mount whose daemon was killed

`mount` daemonizes once the mount is ready; its exit code says whether it worked (0 mounted, 1 the mount
failed, 2 bad arguments or mountpoint). SIGTERM or SIGINT to the daemon unmounts cleanly.

Cache options (--cache-dir, --block-size, ..., --peers) are pcache's: also PCACHE_<NAME> env vars or the
[pcache] table of --config. Mount options also come from FUSEFS_<NAME> env vars or the [fusefs] table.
Flags win over env, env over the file. S3 endpoints and credentials follow the AWS tools: --endpoint-url
or AWS_ENDPOINT_URL, and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from fusefs import control
from fusefs.config import MountConfig
from fusefs.mounts import check_mountpoint, unmount
from lingcore.cli import run_command
from lingcore.config import read_toml_section
from lingcore.errors import ConfigError
from lingcore.log import setup_logging
from lingcore.probe import diagnose
from lingcore.storage import split_url, storage_options
from pcache import CacheConfig
from pcache.options import add_cache_options, cache_config

EXAMPLES = """examples:
  fusefs mount --endpoint-url http://127.0.0.1:8333 s3://datasets/pile/v1 /mnt/pile
  fusefs mount --cache-dir /nvme/pcache --refresh 300 s3://datasets/pile /mnt/pile
  fusefs mount --peers http://10.0.0.2:9470,http://10.0.0.3:9470 --token-file /etc/pcache.token \\
      s3://datasets/pile /mnt/pile
  fusefs mount --foreground file:///data/shards /mnt/shards
  fusefs mount --writable s3://ckpt/run1 /mnt/ckpt && fusefs commit /mnt/ckpt/step100
  fusefs umount /mnt/pile
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusefs", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("mount", help="mount SOURCE_URL at MOUNTPOINT, read-only unless --writable (daemonizes when ready)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE_URL", help="fsspec URL: s3://bucket/prefix, file:///path, ...")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing, empty directory")
    add_cache_options(p)  # pcache's cache and storage options: one definition for every CLI
    p.add_argument("--peers", help="pcache serve nodes, comma-separated http://host:port (env PCACHE_PEERS)")
    p.add_argument("--token-file", default=os.environ.get("PCACHE_TOKEN_FILE"),
                   help="secret shared with the peers, mode 600 (env PCACHE_TOKEN_FILE)")
    g = p.add_argument_group("mount options (env FUSEFS_<NAME>, [fusefs] table of --config)")
    g.add_argument("--foreground", "-f", action="store_true", default=None,
                   help="stay in the foreground instead of daemonizing")
    g.add_argument("--allow-other", action="store_true", default=None,
                   help="let other users read the mount (off by default; needs user_allow_other for non-root)")
    g.add_argument("--refresh", type=float, metavar="SECONDS",
                   help="re-list the origin every SECONDS; changed objects show their new version (default: off)")
    g.add_argument("--entry-timeout", type=float, metavar="SECONDS", help="kernel name cache timeout (default 60)")
    g.add_argument("--attr-timeout", type=float, metavar="SECONDS", help="kernel attribute cache timeout (default 60)")
    g.add_argument("--read-ahead", dest="read_ahead_bytes", metavar="SIZE",
                   help="kernel readahead of the mount (default 16MiB; 0 keeps the kernel's)")
    g.add_argument("--list-workers", type=int, help="prefixes listed in parallel (default 16)")
    g.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on 127.0.0.1:PORT (default off)")
    g.add_argument("--log-file", help="log of the daemon (default <cache-dir>/fusefs.log)")
    g.add_argument("--writable", action="store_true", default=None,
                   help="new files and directories can be made; they are written through pcache write-back "
                        "(close() returns once durable locally); origin objects stay read-only")
    for name, what in (("commit", "wait until every file under DIR is durable at the origin, then write DIR/"
                                  "_COMMITTED with its manifest"),
                       ("flush", "wait until every file under PATH (default: the whole mount) is durable at the "
                                 "origin")):
        p = sub.add_parser(name, help=what + " (writable mounts)")
        p.add_argument("path", metavar="MOUNTPOINT/DIR" if name == "commit" else "MOUNTPOINT[/PATH]")
        p.add_argument("--timeout", type=float, help="give up after SECONDS (default: wait)")
        p.add_argument("--log-format", choices=["text", "json"], help="log format (env PCACHE_LOG_FORMAT)")
    p = sub.add_parser("umount", help="unmount MOUNTPOINT (also a stale mount whose daemon died)")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--log-format", choices=["text", "json"], help="log format (env PCACHE_LOG_FORMAT)")
    for command in sub.choices.values():
        command.add_argument("--log-level", help="DEBUG (errors with their traceback), INFO (default), WARNING "
                                                 "(env PCACHE_LOG_LEVEL)")
    return parser


def _has_table(path: str | None, name: str) -> bool:
    if not path:
        return False
    return name in read_toml_section(path, "\0whole-file\0")


def load_configs(args: argparse.Namespace) -> tuple[MountConfig, CacheConfig]:
    """Build the mount and cache configs from flags, env and the TOML file (its tables are optional)."""
    toml = args.config or os.environ.get("PCACHE_CONFIG") or os.environ.get("FUSEFS_CONFIG")
    keys = ("foreground", "allow_other", "refresh", "entry_timeout", "attr_timeout",
            "read_ahead_bytes", "list_workers", "metrics_port", "log_file", "writable")
    mount = MountConfig.load(toml if _has_table(toml, "fusefs") else None, **{k: getattr(args, k) for k in keys})
    args.config = toml if _has_table(toml, "pcache") else None
    saved = os.environ.pop("PCACHE_CONFIG", None)  # the [pcache] table is read through args.config only
    try:
        cache = cache_config(args)
    finally:
        if saved is not None:
            os.environ["PCACHE_CONFIG"] = saved
    return mount, cache


def cmd_mount(args: argparse.Namespace) -> int:
    from fusefs.daemon import Mount, MountSpec

    mount_config, cache_settings = load_configs(args)
    # The configs are complete now; the TOML file must not be read again (as a [pcache]-less file) when
    # the daemon builds its PCacheFileSystem from them.
    os.environ.pop("PCACHE_CONFIG", None)
    protocol, path = split_url(args.source)
    if protocol == "file":
        path = os.path.abspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"source directory {path} does not exist")
    else:  # before the fork: unreachable, forbidden or a missing bucket is one line here, within seconds
        problem = diagnose(args.source, storage_options(protocol, args.endpoint_url))
        if problem is not None:
            raise problem
    mountpoint = check_mountpoint(args.mountpoint)
    spec = MountSpec(protocol, path, mountpoint, storage_options(protocol, args.endpoint_url))

    def serve(ready: Callable[[str | None], None]) -> int:
        return Mount(spec, mount_config, cache_settings).serve(ready)

    if mount_config.foreground:
        return serve(lambda err: print(f"fusefs mount: error: {err}" if err else f"mounted {mountpoint}",
                                       file=sys.stderr, flush=True))
    log_file = mount_config.log_file or os.path.join(cache_settings.cache_dir, "fusefs.log")
    return daemonize(serve, log_file)


def daemonize(serve: Callable[[Callable[[str | None], None]], int], log_file: str) -> int:
    """Fork a daemon that runs ``serve``; return 0 once it reports the mount ready, else its error code.

    The fork happens before any thread or event loop exists (s3fs and pcache start threads lazily), and
    the daemon reports through a pipe, so the parent's exit code says whether the mount worked.
    """
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message.startswith("READY"):
            return 0
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        print(f"fusefs mount: error: {message.strip() or f'daemon exited before the mount was ready; see {log_file}'}",
              file=sys.stderr)
        return code if code > 0 else 1
    code = 1
    try:
        os.close(read_fd)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.chdir("/")
        # New line-buffered streams on the log file, so every log line lands whole and at once.
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        setup_logging()

        def ready(error: str | None) -> None:
            nonlocal write_fd
            if write_fd < 0:
                return
            os.write(write_fd, b"READY" if error is None else error.encode())
            os.close(write_fd)
            write_fd = -1

        code = serve(ready)
    except BaseException as exc:  # noqa: BLE001 - the daemon must report, then exit
        print(f"fusefs daemon failed: {exc!r}", file=sys.stderr, flush=True)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def cmd_umount(args: argparse.Namespace) -> int:
    unmount(args.mountpoint)
    print(f"unmounted {os.path.abspath(args.mountpoint)}")
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    reply = control.request(args.path, "commit", args.timeout)
    print(f"committed {reply['url']}")
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    reply = control.request(args.path, "flush", args.timeout)
    print(f"flushed {reply['url']}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"mount": cmd_mount, "umount": cmd_umount,
                                                             "commit": cmd_commit, "flush": cmd_flush}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.log_format:  # also for the daemon child, which sets its logging up again after the fork
        os.environ["PCACHE_LOG_FORMAT"] = args.log_format
    if args.log_level:
        os.environ["PCACHE_LOG_LEVEL"] = args.log_level
    setup_logging(args.log_level, json_format=(args.log_format == "json") if args.log_format else None)
    return run_command("fusefs", COMMANDS, args, (ConfigError, ValueError, FileNotFoundError, PermissionError))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
