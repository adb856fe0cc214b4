"""The ``weightd`` command: fetch, ls, verify, gc (and, later, the daemon).

Commands that work without a daemon open the cache with the same lock the daemon takes,
so they refuse politely while a daemon owns the cache.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from weightd import __version__
from weightd.config import Config, ConfigError, add_flags, flag_values, format_size, load_config
from weightd.config import parse_size as _parse_size
from weightd.errors import WeightdError

log = logging.getLogger("weightd")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _config(ns: argparse.Namespace) -> Config:
    return load_config(ns.config, overrides=flag_values(ns))


def cmd_fetch(cfg: Config, ns: argparse.Namespace) -> int:
    from weightd.progress import progress_for
    from weightd.store import Fetcher, Store

    with Store.open(cfg.cache_dir) as store:
        fetcher = Fetcher(store, cfg)
        cb = progress_for(ns.source)
        try:
            snap = fetcher.fetch(ns.source, include=ns.include or None, exclude=ns.exclude or ())
        finally:
            close = getattr(cb, "close", None)
            if close:
                close()
    s = snap.stats
    rate = s.bytes_fetched / s.seconds if s.seconds else 0.0
    print(f"{snap.source}: {s.files} files, {format_size(s.bytes_total)}; {s.hits} already "
          f"cached; fetched {format_size(s.bytes_fetched)} in {s.seconds:.2f}s "
          f"({format_size(rate)}/s)", file=sys.stderr)
    print(snap.path)
    return 0


def cmd_ls(cfg: Config, ns: argparse.Namespace) -> int:
    from weightd.store import Store

    with Store.open(cfg.cache_dir) as store:
        models = store.index.models()
        if not models:
            print(f"no models in {cfg.cache_dir}", file=sys.stderr)
            return 0
        print(f"{'MODEL':<48} {'FILES':>5} {'SIZE':>10} {'LAST USED':<19} STATE  SOURCE")
        for m in models:
            state = "ok" if store.model_complete(m) else "broken"
            used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.last_used))
            print(f"{m.name:<48} {len(m.files):>5} {format_size(m.size):>10} {used:<19} "
                  f"{state:<6} {m.source}")
    return 0


def cmd_verify(cfg: Config, ns: argparse.Namespace) -> int:
    from weightd.store import Store

    with Store.open(cfg.cache_dir, exclusive=True) as store:
        t0 = time.monotonic()
        report = store.verify()
        dt = time.monotonic() - t0
    for digest in report.corrupt:
        print(f"CORRUPT {digest}: moved to quarantine/ (the next fetch downloads it again)")
    for digest in report.missing:
        print(f"MISSING {digest}: in the index but not on disk (forgotten)")
    print(f"verified {report.checked} blobs, {format_size(report.bytes)} in {dt:.1f}s: "
          f"{len(report.corrupt)} corrupt, {len(report.missing)} missing", file=sys.stderr)
    return 1 if report.corrupt or report.missing else 0


def cmd_gc(cfg: Config, ns: argparse.Namespace) -> int:
    from weightd.store import Store

    budget = _parse_size(ns.max_bytes)
    with Store.open(cfg.cache_dir, exclusive=True) as store:
        plan = store.plan_gc(budget)
        for name in plan.models:
            print(f"evict model {name}")
        for digest, size in plan.blobs:
            print(f"delete blob {digest} ({format_size(size)})")
        for rev in plan.revisions:
            print(f"delete old revision {rev}")
        verb = "would free" if ns.dry_run else "freed"
        if not ns.dry_run:
            store.run_gc(plan)
    print(f"{verb} {format_size(plan.freed)}: {format_size(plan.before)} -> "
          f"{format_size(plan.after)} (budget {format_size(budget)})", file=sys.stderr)
    return 0


def cmd_serve(cfg: Config, ns: argparse.Namespace) -> int:
    from weightd.server import serve

    return serve(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightd", description="Model-weight cache and daemon for fast model cold starts.")
    parser.add_argument("--version", action="version", version=f"weightd {__version__}")
    parser.add_argument("--config", default=None,
                        help="TOML config file (default: WEIGHTD_CONFIG, else none)")
    add_flags(parser)
    common = argparse.ArgumentParser(add_help=False)
    add_flags(common, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", parents=[common],
                       help="run the daemon on its unix socket until SIGTERM")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("fetch", parents=[common],
                       help="fetch a model into the cache; print its snapshot path")
    p.add_argument("source", help="s3://, gs://, hf://, http(s)://, file:// URL or a path")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="files to bring from a directory (repeatable; default: shards and "
                        "side files)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="files to leave out")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("ls", parents=[common], help="list cached models")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("verify", parents=[common],
                       help="rehash every blob; quarantine corrupt ones")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("gc", parents=[common], help="evict least recently used models and blobs")
    p.add_argument("--max-bytes", required=True, help="what the blobs may take (e.g. 100GiB)")
    p.add_argument("--dry-run", action="store_true", help="show the plan, delete nothing")
    p.set_defaults(func=cmd_gc)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        cfg = _config(ns)
    except ConfigError as e:
        print(f"weightd: {e}", file=sys.stderr)
        return 2
    _setup_logging(cfg.log_level)
    try:
        return int(ns.func(cfg, ns))
    except WeightdError as e:
        print(f"weightd: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
