"""The ``weightd`` command: fetch, ls, verify, gc (and, later, the daemon).

Commands that work without a daemon open the cache with the same lock the daemon takes,
so they refuse politely while a daemon owns the cache.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from weightd import __version__
from weightd.config import (
    Config,
    ConfigError,
    add_flags,
    arg_type,
    default_text,
    flag_values,
    format_size,
    load_config,
    parse_size,
)
from weightd.errors import DaemonUnavailable, WeightdError

log = logging.getLogger("weightd")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _config(ns: argparse.Namespace) -> Config:
    return load_config(ns.config, overrides=flag_values(ns))


def _daemon(cfg: Config) -> Any:
    """A client of the daemon on ``cfg.socket``, or None when no daemon answers there
    (no such socket, or nobody listening on it).

    Raises:
        DaemonUnavailable: the client refuses the socket (someone else could have put it
            there: the message says who and why); that is no reason to go on without the
            daemon.
    """
    if not Path(cfg.socket).exists():
        return None
    import weightd_client
    from weightd_client.rundir import check_socket

    check_socket(cfg.socket)
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
            fetcher.close()  # the write-back to the mirror, if there is one, ends first
    s = snap.stats
    rate = s.bytes_fetched / s.seconds if s.seconds else 0.0
    mirrored = f" ({format_size(s.bytes_mirror)} from the mirror)" if s.bytes_mirror else ""
    print(f"{snap.source}: {s.files} files, {format_size(s.bytes_total)}; {s.hits} already "
          f"cached; fetched {format_size(s.bytes_fetched)}{mirrored} in {s.seconds:.2f}s "
          f"({format_size(rate)}/s)", file=sys.stderr)
    print(snap.path)
    return 0


def cmd_mirror_push(cfg: Config, ns: argparse.Namespace) -> int:
    """Put a model in the cluster's mirror ahead of a launch: fetched into the node's
    cache (through the daemon when one serves), then each blob the mirror lacks is
    uploaded and the manifest written; one line per file, a summary."""
    from weightd.sources import open_source
    from weightd.store import Fetcher, Store
    from weightd.store.mirror import Mirror, snapshot_files

    if not cfg.mirrors:
        raise ConfigError("no mirror is configured: set mirrors = [\"s3://bucket/prefix\"] "
                          "(WEIGHTD_MIRRORS, --mirrors) and its mirror_* settings")
    mirror = Mirror(cfg.mirrors[0], cfg)
    include, exclude = ns.include or None, ns.exclude or ()
    with open_source(ns.source, cfg) as source:
        url, listed = source.url, source.list_files(include, exclude)
    entries = mirror.manifest(url, listed)
    if entries is not None and all(mirror.has_blob(e.digest, e.size) for e in entries.values()):
        for e in sorted(entries.values(), key=lambda x: x.relpath):
            print(f"in the mirror  {e.relpath}  {format_size(e.size)}")
        print(f"{url}: {len(entries)} files, already in {mirror.url}", file=sys.stderr)
        return 0

    def report(f: Any, what: str) -> None:
        print(f"{what:<13}  {f.relpath}  {format_size(f.size)}", flush=True)

    client = _daemon(cfg)
    if client is not None:  # the daemon owns the cache: it fetches, we read its blobs
        with client:
            path = client.fetch(ns.source, include=ns.include, exclude=ns.exclude)
        source_url, files, blob_path = snapshot_files(path)
        uploaded, nbytes = mirror.push(source_url, files, blob_path, report)
    else:
        with Store.open(cfg.cache_dir) as store:
            # the push writes the model to the mirror itself (and says so, file by file)
            fetcher = Fetcher(store, cfg.replace(mirrors=()))
            snap = fetcher.fetch(ns.source, include=include, exclude=exclude)
            files = list(snap.files)
            uploaded, nbytes = mirror.push(snap.source, files, store.blob_path, report)
    total = sum(f.size for f in files)
    print(f"{url}: {len(files)} files, {format_size(total)} in {mirror.url}: {uploaded} "
          f"uploaded ({format_size(nbytes)}), {len(files) - uploaded} already there; "
          "manifest written", file=sys.stderr)
    return 0


def _table(header: Sequence[str], rows: Sequence[Sequence[str]],
           right: Sequence[str] = ("FILES", "SIZE", "USED", "BUDGET")) -> list[str]:
    """Rows under a header, each column as wide as its widest cell (a long model name
    widens its column rather than shifting its row); the last column is not padded."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for r in [header, *rows]:
        cells = [str(c).rjust(w) if h in right else str(c).ljust(w)
                 for c, w, h in zip(r, widths, header, strict=True)]
        out.append("  ".join(cells[:-1] + [str(r[-1])]).rstrip())
    return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _snapshot_state(path: str) -> str:
    """"ok" when every file of a snapshot resolves to a blob, "broken" when one does not,
    "?" when the snapshot cannot be read (the daemon's cache, another user's)."""
    try:
        files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    except OSError:
        return "?"
    if not files and not os.access(path, os.R_OK):
        return "?"
    return "ok" if files and all(os.path.exists(f) for f in files) else "broken"


def cmd_ls(cfg: Config, ns: argparse.Namespace) -> int:
    """The cached models, one row each, with the same columns whether the daemon answers
    or not. STATE: every blob there ("ok") or not ("broken"); WHERE: the tiers it is
    resident on, else disk; LAST USED: its last fetch, Acquire or load (``weightd gc``
    evicts the oldest first)."""
    from weightd.store import Store

    client = _daemon(cfg)
    now = time.time()
    if client is not None:  # the daemon owns the cache: ask it
        with client:
            rows = [(m.model, str(m.files), format_size(m.bytes), _snapshot_state(m.snapshot_path),
                     "+".join(_tier_name(r.tier) for r in m.resident) or "disk",
                     _ago(now, m.last_used), m.source)
                    for m in client.list()]
    else:
        with Store.open(cfg.cache_dir) as store:
            rows = [(m.name, str(len(m.files)), format_size(m.size),
                     "ok" if store.model_complete(m) else "broken", "disk",
                     _ago(now, m.last_used), m.source)
                    for m in store.index.models()]
    for line in _table(("MODEL", "FILES", "SIZE", "STATE", "WHERE", "LAST USED", "SOURCE"),
                       rows):
        print(line)
    if not rows:
        print(f"no models in {cfg.cache_dir}", file=sys.stderr)
    return 0


def cmd_verify(cfg: Config, ns: argparse.Namespace) -> int:
    from weightd.store import Store

    client = _daemon(cfg)
    if client is not None:  # the daemon owns the cache: it verifies (and knows what is held)
        with client:
            r = client.verify()
        corrupt, missing, in_use, checked, nbytes, dt = (
            list(r.corrupt), list(r.missing), set(r.in_use), r.checked, r.bytes, r.seconds)
        modes = [(m.path, m.old_mode, m.new_mode) for m in r.modes]
    else:
        with Store.open(cfg.cache_dir, exclusive=True) as store:
            t0 = time.monotonic()
            report = store.verify()
            dt = time.monotonic() - t0
        corrupt, missing, in_use = list(report.corrupt), list(report.missing), set()
        checked, nbytes, modes = report.checked, report.bytes, list(report.modes)
    for digest in corrupt:
        if digest in in_use:
            print(f"CORRUPT {digest}: in use, left in place (no new lease uses it; it is "
                  "fetched again once nothing holds it)")
        else:
            print(f"CORRUPT {digest}: moved to quarantine/ (the next fetch downloads it again)")
    for digest in missing:
        print(f"MISSING {digest}: in the index but not on disk (forgotten)")
    for path, old, new in modes:
        print(f"MODE {path}: {old:04o} was readable or writable by more than the daemon's "
              f"user and group: narrowed to {new:04o}")
    print(f"verified {checked} blobs, {format_size(nbytes)} in {dt:.1f}s: "
          f"{len(corrupt)} corrupt, {len(missing)} missing, "
          f"{len(modes)} modes narrowed", file=sys.stderr)
    return 1 if corrupt or missing else 0


def cmd_gc(cfg: Config, ns: argparse.Namespace) -> int:
    from weightd.store import Store

    budget = ns.max_bytes  # a size: parsed (and refused, exit 2) with the command line
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
    if after > budget:
        print(f"kept {format_size(after)}: models in use (resident, leased, pinned or being "
              "fetched) are never removed; `weightd evict` or `weightd unpin` them first",
              file=sys.stderr)
    return 0


def _tier_name(tier: Any) -> str:
    from weightd_client.client import TIER_NAMES

    return TIER_NAMES.get(tier) or "-"


def _age(seconds: float) -> str:
    """``42s``, ``3m 05s``, ``2h 10m``, ``2d 03h``: how long a lease has been held."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def _ago(now: float, when: float) -> str:
    """``12s ago``, ``5m ago``, ``3h ago``, ``2d ago`` (:func:`_age`'s first unit): when a
    model was last used (the order ``weightd gc`` evicts in, oldest first); ``-`` when
    never recorded."""
    return f"{_age(now - when).split()[0]} ago" if when > 0 else "-"


def cmd_status(cfg: Config, ns: argparse.Namespace) -> int:
    """The tiers; then one row per resident model and tier (size, pin, leases) with one
    line per lease holder (pid, name, age); then the pins and the problems."""
    with _need_daemon(cfg) as client:
        st = client.status()
        models = client.list()
    now = time.time()
    print(f"weightd {st.version}, pid {st.pid}, up {_age(st.uptime_seconds)}; "
          f"cache {st.cache_dir}, socket {cfg.socket}\n")
    tiers = []
    for t in st.tiers:
        state = ("ok" + (", mlocked" if t.locked else "")) if t.available else "unavailable"
        tiers.append((_tier_name(t.tier), t.device or "-", format_size(t.bytes_used),
                      format_size(t.bytes_budget) if t.bytes_budget else "-",
                      state + (f" ({t.reason})" if t.reason else "")))
    for line in _table(("TIER", "DEVICE", "USED", "BUDGET", "STATE"), tiers):
        print(line)
    resident = [(m, r) for m in models for r in m.resident]
    print(f"\n{_plural(len(models), 'model')} cached, "
          f"{len({m.model for m, _ in resident})} resident, {_plural(len(st.leases), 'lease')}, "
          f"{_plural(len(st.pins), 'pin')}")
    rows, holders = [], []
    for m, r in resident:
        pinned = any(p.model == m.model and p.tier == r.tier and p.device == r.device
                     for p in st.pins)
        held = sorted((x for x in st.leases if x.model == m.model and x.device == r.device),
                      key=lambda x: x.since)
        rows.append((m.model, _tier_name(r.tier), r.device, format_size(r.bytes),
                     "pinned" if pinned else "-", _plural(len(held), "lease") if held else "-"))
        holders.append([f"    lease: pid {x.pid}"
                        + (f' "{x.client_name}"' if x.client_name else "")
                        + f", age {_age(now - x.since)}"
                        + (f", id {x.lease_id}" if x.lease_id else "") for x in held])
    if rows:
        lines = _table(("MODEL", "TIER", "DEVICE", "SIZE", "PIN", "LEASES"), rows)
        print("\n" + lines[0])
        for line, under in zip(lines[1:], holders, strict=True):
            print(line)
            for holder in under:
                print(holder)
    if st.pins:
        print()
    for p in st.pins:
        print(f"  pin {p.model} on {_tier_name(p.tier)}: {p.state}")
    shown = [t.reason for t in st.tiers if t.reason]
    for problem in st.problems:
        if not any(reason in problem for reason in shown):  # already in the tiers' table
            print(f"problem: {problem}")
    _print_traffic(st, now)
    return 0


def _print_traffic(st: Any, now: float) -> None:
    """Bytes by where they came from per model, and the mirror's state (locks held or
    waited for, with their holder and age)."""
    if st.model_bytes:
        rows = [(m.model, format_size(m.origin), format_size(m.mirror), format_size(m.cache))
                for m in st.model_bytes]
        print()
        for line in _table(("MODEL", "ORIGIN", "MIRROR", "CACHE"), rows,
                           right=("ORIGIN", "MIRROR", "CACHE")):
            print(line)
    if not st.HasField("mirror"):
        return
    m = st.mirror
    print(f"\nmirror {m.url} (endpoint {m.endpoint}): conditional writes {m.conditional_writes}; "
          f"{_plural(m.write_backs, 'write-back')} in progress, "
          f"{_plural(m.problems, 'problem')}")
    for lock in m.locks:
        who = f"{lock.holder}, lock taken {_age(now - lock.since)} ago"
        if lock.state == "waiting":
            print(f"  waiting for {lock.source}: {who}")
        else:
            print(f"  {lock.state}: {lock.source} ({who})")
    if m.last_problem:
        print(f"  last problem: {m.last_problem}")


def _source_of(client: Any, ref: str) -> str:
    """The source a model name (as ``weightd ls`` prints it) was fetched from; a URL as
    given; an existing path made absolute (the daemon's working directory is not ours).

    Raises:
        SourceNotFound: ``ref`` is neither a cached model's name, a URL nor a path.
    """
    from weightd.errors import SourceNotFound

    if "://" in ref:
        return ref
    if os.path.exists(ref):
        return os.path.abspath(ref)
    for m in client.list():
        if m.model == ref:
            return str(m.source)
    raise SourceNotFound(f"{ref}: not found: no model of that name is cached (see "
                         "`weightd ls`), and there is no such file or directory")


def cmd_pin(cfg: Config, ns: argparse.Namespace) -> int:
    with _need_daemon(cfg) as client:
        source = _source_of(client, ns.source)
        if ns.command == "pin":
            name = client.pin(source, tier=ns.tier)
            print(f"pinned {name} on the {ns.tier} tier (warming in the background: "
                  "see `weightd status`)", file=sys.stderr)
        elif not client.unpin(source, tier=ns.tier):
            print(f"weightd: {ns.source} was not pinned on the {ns.tier} tier", file=sys.stderr)
            return 1
    return 0


def cmd_evict(cfg: Config, ns: argparse.Namespace) -> int:
    with _need_daemon(cfg) as client:
        freed = client.evict(_source_of(client, ns.source), tier=ns.tier)
    if not freed:  # (a resident model holds its bytes: none freed is none resident)
        print(f"weightd: {ns.source} is not resident on the {ns.tier} tier: nothing to "
              "evict", file=sys.stderr)
        return 1
    print(f"freed {format_size(freed)}", file=sys.stderr)
    return 0


def cmd_release(cfg: Config, ns: argparse.Namespace) -> int:
    """End leases by id, or every lease of a process (``--pid``): the operator's way to
    free a model whose holder hangs. Another process's leases are for root or the
    daemon's user; Status shows their ids only to them."""
    from weightd.errors import LeaseNotFound, NotPermitted

    if bool(ns.lease_ids) == (ns.pid is not None):
        raise ConfigError("give lease ids or --pid PID (one of them)")
    with _need_daemon(cfg) as client:
        shown = client.status().leases
        leases = {x.lease_id: x for x in shown if x.lease_id}
        if ns.pid is not None:
            held = [x for x in shown if x.pid == ns.pid]
            if any(not x.lease_id for x in held):
                raise NotPermitted(f"pid {ns.pid} holds {_plural(len(held), 'lease')}: "
                                   "releasing another process's leases is for root or the "
                                   "daemon's user")
            ids = [x.lease_id for x in held]
            if not ids:
                raise LeaseNotFound(f"pid {ns.pid} holds no lease")
        else:
            ids = list(ns.lease_ids)
        for lease_id in ids:
            client.release(lease_id)
            lease = leases.get(lease_id)
            print(f"released lease {lease_id}" + (
                f" of pid {lease.pid} on {lease.model} ({lease.device})" if lease else ""),
                file=sys.stderr)
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


class _Parser(argparse.ArgumentParser):
    """argparse with a usage mistake as one line on stderr (exit 2), not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


EXIT_CODES = """\
exit codes:
  0    done
  1    the operation failed: the source, the cache or the daemon said no (the
       one line on stderr says why)
  2    a usage or configuration mistake: an unknown command or flag, a bad value
       (size, share, duration), a bad setting in the config file or WEIGHTD_*
  130  interrupted"""


def _epilog() -> str:
    return f"""\
defaults (for this user):
  cache    {default_text("cache_dir")}  (cache_dir)
  socket   {default_text("socket")}  (socket)
  config   none; --config FILE or WEIGHTD_CONFIG
  metrics  off; set metrics_address (--metrics-address, WEIGHTD_METRICS_ADDRESS),
           e.g. 127.0.0.1:9464, to serve Prometheus text; `weightd stats` reads it

Every setting has one name: cache_dir in the TOML file, WEIGHTD_CACHE_DIR in the
environment, --cache-dir here (flags override the environment, which overrides the
file); a command takes them after its name too. Sizes take units (64MiB, 2GB).

{EXIT_CODES}
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="weightd", description="Model-weight cache and daemon for fast model cold starts.",
        usage="weightd [--config FILE] [--SETTING VALUE ...] COMMAND [ARGS]",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"weightd {__version__}")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="TOML config file (default: WEIGHTD_CONFIG, else none)")
    add_flags(parser)
    common = _Parser(add_help=False)
    add_flags(common, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        about = textwrap.fill(f"{text[0].upper()}{text[1:]}. Takes every --SETTING that "
                              "`weightd --help` lists.", 80)
        return sub.add_parser(name, prog=f"weightd {name}", parents=[common], help=text,
                              description=about, epilog=EXIT_CODES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = command("serve", "run the daemon on its unix socket until SIGTERM")
    p.set_defaults(func=cmd_serve)

    p = command("fetch", "fetch a model into the cache; print its snapshot path")
    p.add_argument("source", help="s3://, gs://, hf://, http(s)://, file:// URL or a path")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="files to bring from a directory (repeatable; default: shards and "
                        "side files)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="files to leave out")
    p.set_defaults(func=cmd_fetch)

    p = command("status", "the daemon's tiers, resident models, leases, pins and problems")
    p.set_defaults(func=cmd_status)

    for name, text in (("pin", "keep a model resident on a tier (survives restarts)"),
                       ("unpin", "drop a pin; the model becomes evictable")):
        p = command(name, text)
        p.add_argument("source", help="the reference, or the model's name as `weightd ls` "
                                      "prints it")
        p.add_argument("--tier", choices=("host", "disk"), default="host")
        p.set_defaults(func=cmd_pin)

    p = command("evict", "drop an unleased, unpinned model from host memory now")
    p.add_argument("source", help="the reference, or the model's name as `weightd ls` "
                                  "prints it")
    p.add_argument("--tier", choices=("host",), default="host")
    p.set_defaults(func=cmd_evict)

    p = command("release", "end leases by id (`weightd status` shows them), or every "
                           "lease of a process; another process's: root or the daemon's "
                           "user only")
    p.add_argument("lease_ids", nargs="*", metavar="LEASE_ID", help="the leases to end")
    p.add_argument("--pid", type=int, metavar="PID", help="end every lease of this process")
    p.set_defaults(func=cmd_release)

    p = command("stats", "the daemon's metrics (from metrics_address) as a table")
    p.set_defaults(func=cmd_stats)

    p = command("mirror", "the cluster's mirror (the mirrors setting)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    push = actions.add_parser(
        "push", prog="weightd mirror push", parents=[common],
        help="put a model in the mirror ahead of a launch",
        description=textwrap.fill(
            "Put a model in the cluster's mirror ahead of a launch: it is fetched into this "
            "node's cache (through the daemon when one serves), then each file the mirror "
            "lacks is uploaded and its manifest written. One line per file on stdout, a "
            "summary on stderr. Takes every --SETTING that `weightd --help` lists.", 80),
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    push.add_argument("source", help="s3://, gs://, hf://, http(s):// URL")
    push.add_argument("--include", action="append", metavar="GLOB",
                      help="files to bring from a directory (repeatable)")
    push.add_argument("--exclude", action="append", metavar="GLOB", help="files to leave out")
    push.set_defaults(func=cmd_mirror_push)

    p = command("ls", "list cached models (through the daemon when one answers)")
    p.set_defaults(func=cmd_ls)

    p = command("verify", "rehash every blob; quarantine corrupt ones (through the daemon "
                          "when one answers: root or the daemon's user)")
    p.set_defaults(func=cmd_verify)

    p = command("gc", "evict least recently used models and blobs (through the daemon when "
                      "one answers: root or the daemon's user)")
    p.add_argument("--max-bytes", required=True, type=arg_type("size", parse_size),
                   metavar="SIZE", help="what the blobs may take (e.g. 100GiB)")
    p.add_argument("--dry-run", action="store_true", help="show the plan, delete nothing")
    p.set_defaults(func=cmd_gc)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``weightd`` command. A user's mistake is one line on stderr and an exit code
    (see :data:`EXIT_CODES`), never a traceback."""
    ns = build_parser().parse_args(argv)
    try:
        cfg = _config(ns)
        _setup_logging(cfg.log_level)
        return int(ns.func(cfg, ns))
    except ConfigError as e:
        print(f"weightd: {e}", file=sys.stderr)
        return 2
    except WeightdError as e:
        print(f"weightd: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `weightd ls | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
