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
from pathlib import Path
from typing import Any

from weightd import __version__
from weightd.config import Config, ConfigError, add_flags, flag_values, format_size, load_config
from weightd.config import parse_size as _parse_size
from weightd.errors import DaemonUnavailable, WeightdError

log = logging.getLogger("weightd")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _config(ns: argparse.Namespace) -> Config:
    return load_config(ns.config, overrides=flag_values(ns))


def _daemon(cfg: Config) -> Any:
    """A client of the daemon on ``cfg.socket``, or None when no daemon answers there."""
    if not Path(cfg.socket).exists():
        return None
    import weightd_client

    client = weightd_client.Client(cfg.socket, timeout=24 * 3600)
    try:
        client.status()
    except weightd_client.errors.DaemonUnavailable:
        client.close()
        return None
    return client


def _need_daemon(cfg: Config) -> Any:
    client = _daemon(cfg)
    if client is None:
        raise DaemonUnavailable(f"no weightd daemon answers on {cfg.socket} "
                                "(start one with `weightd serve`, or pass --socket)")
    return client


def cmd_fetch(cfg: Config, ns: argparse.Namespace) -> int:
    from weightd.progress import progress_for
    from weightd.store import Fetcher, Store

    client = _daemon(cfg)
    if client is not None:  # the daemon owns the cache: fetch through it
        cb = progress_for(ns.source)
        with client:
            try:
                path = client.fetch(ns.source, include=ns.include, exclude=ns.exclude,
                                    callback=cb)
            finally:
                getattr(cb, "close", lambda: None)()
        print(f"{ns.source}: fetched through the daemon on {cfg.socket}", file=sys.stderr)
        print(path)
        return 0
    with Store.open(cfg.cache_dir) as store:
        fetcher = Fetcher(store, cfg)
        cb = progress_for(ns.source)
        try:
            snap = fetcher.fetch(ns.source, include=ns.include or None, exclude=ns.exclude or (),
                                 callback=cb)
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

    client = _daemon(cfg)
    if client is not None:  # the daemon owns the cache: ask it
        with client:
            for m in client.list():
                where = ",".join(_tier_name(r.tier) for r in m.resident) or "disk"
                print(f"{m.model:<48} {m.files:>5} {format_size(m.bytes):>10} {where:<10} "
                      f"{m.source}")
        return 0

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

    client = _daemon(cfg)
    if client is not None:  # the daemon owns the cache: it verifies (and knows what is held)
        with client:
            r = client.verify()
        corrupt, missing, in_use, checked, nbytes, dt = (
            list(r.corrupt), list(r.missing), set(r.in_use), r.checked, r.bytes, r.seconds)
    else:
        with Store.open(cfg.cache_dir, exclusive=True) as store:
            t0 = time.monotonic()
            report = store.verify()
            dt = time.monotonic() - t0
        corrupt, missing, in_use = list(report.corrupt), list(report.missing), set()
        checked, nbytes = report.checked, report.bytes
    for digest in corrupt:
        if digest in in_use:
            print(f"CORRUPT {digest}: in use, left in place (no new lease uses it; it is "
                  "fetched again once nothing holds it)")
        else:
            print(f"CORRUPT {digest}: moved to quarantine/ (the next fetch downloads it again)")
    for digest in missing:
        print(f"MISSING {digest}: in the index but not on disk (forgotten)")
    print(f"verified {checked} blobs, {format_size(nbytes)} in {dt:.1f}s: "
          f"{len(corrupt)} corrupt, {len(missing)} missing", file=sys.stderr)
    return 1 if corrupt or missing else 0


def cmd_gc(cfg: Config, ns: argparse.Namespace) -> int:
    from weightd.store import Store

    budget = _parse_size(ns.max_bytes)
    client = _daemon(cfg)
    if client is not None:  # through the daemon: it never deletes what it holds
        with client:
            r = client.gc(budget, dry_run=ns.dry_run)
        models, blobs, revisions = list(r.models), [(b.digest, b.size) for b in r.blobs], list(
            r.revisions)
        before, after = r.before, r.after
    else:
        with Store.open(cfg.cache_dir, exclusive=True) as store:
            plan = store.plan_gc(budget)
            if not ns.dry_run:
                store.run_gc(plan)
        models, blobs, revisions = list(plan.models), list(plan.blobs), [
            str(rev) for rev in plan.revisions]
        before, after = plan.before, plan.after
    for name in models:
        print(f"evict model {name}")
    for digest, size in blobs:
        print(f"delete blob {digest} ({format_size(size)})")
    for rev in revisions:
        print(f"delete old revision {rev}")
    verb = "would free" if ns.dry_run else "freed"
    print(f"{verb} {format_size(before - after)}: {format_size(before)} -> "
          f"{format_size(after)} (budget {format_size(budget)})", file=sys.stderr)
    return 0


def _tier_name(tier: Any) -> str:
    from weightd_client.client import TIER_NAMES

    return TIER_NAMES.get(tier) or "-"


def cmd_status(cfg: Config, ns: argparse.Namespace) -> int:
    with _need_daemon(cfg) as client:
        st = client.status()
        models = client.list()
    print(f"weightd {st.version}, pid {st.pid}, up {st.uptime_seconds:.0f}s, "
          f"cache {st.cache_dir}")
    print(f"{'TIER':<5} {'DEVICE':<12} {'USED':>10} {'BUDGET':>10}  STATE")
    for t in st.tiers:
        state = ("ok" + (", mlocked" if t.locked else "")) if t.available else "unavailable"
        reason = f" ({t.reason})" if t.reason else ""
        budget = format_size(t.bytes_budget) if t.bytes_budget else "-"
        print(f"{_tier_name(t.tier):<5} {t.device or '-':<12} {format_size(t.bytes_used):>10} "
              f"{budget:>10}  {state}{reason}")
    print(f"\n{len(models)} models, {len(st.leases)} leases, {len(st.pins)} pins")
    for m in models:
        where = ", ".join(f"{_tier_name(r.tier)} ({r.leases} leases)" for r in m.resident)
        print(f"  {m.model}  {format_size(m.bytes)}  {where or 'disk only'}")
    for p in st.pins:
        print(f"  pin {p.model} on {_tier_name(p.tier)}: {p.state}")
    for problem in st.problems:
        print(f"problem: {problem}")
    return 0


def cmd_pin(cfg: Config, ns: argparse.Namespace) -> int:
    with _need_daemon(cfg) as client:
        if ns.command == "pin":
            name = client.pin(ns.source, tier=ns.tier)
            print(f"pinned {name} on the {ns.tier} tier (warming in the background: "
                  "see `weightd status`)", file=sys.stderr)
        elif not client.unpin(ns.source, tier=ns.tier):
            print(f"{ns.source} was not pinned on the {ns.tier} tier", file=sys.stderr)
            return 1
    return 0


def cmd_evict(cfg: Config, ns: argparse.Namespace) -> int:
    with _need_daemon(cfg) as client:
        freed = client.evict(ns.source, tier=ns.tier)
    print(f"freed {format_size(freed)}", file=sys.stderr)
    return 0


def cmd_stats(cfg: Config, ns: argparse.Namespace) -> int:
    from weightd.metrics import render_table, scrape

    if not cfg.metrics_address:
        raise DaemonUnavailable("metrics_address is not set: the daemon serves no metrics "
                                "(set it in the config, WEIGHTD_METRICS_ADDRESS or "
                                "--metrics-address)")
    try:
        text = scrape(cfg.metrics_address)
    except OSError as e:
        raise DaemonUnavailable(f"no metrics at {cfg.metrics_address}: {e}") from e
    print(render_table(text), end="")
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

    p = sub.add_parser("status", parents=[common],
                       help="the daemon's tiers, models, leases, pins and problems")
    p.set_defaults(func=cmd_status)

    for name, text in (("pin", "keep a model resident on a tier (survives restarts)"),
                       ("unpin", "drop a pin; the model becomes evictable")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("source")
        p.add_argument("--tier", choices=("host", "disk"), default="host")
        p.set_defaults(func=cmd_pin)

    p = sub.add_parser("evict", parents=[common],
                       help="drop an unleased, unpinned model from host memory now")
    p.add_argument("source", help="the reference or the model name (see `weightd status`)")
    p.add_argument("--tier", choices=("host",), default="host")
    p.set_defaults(func=cmd_evict)

    p = sub.add_parser("stats", parents=[common],
                       help="the daemon's metrics (from metrics_address) as a table")
    p.set_defaults(func=cmd_stats)

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
