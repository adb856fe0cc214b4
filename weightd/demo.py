"""``make demo``: what weightd does for N replicas of one model, every figure measured.

1. a demo model (synthetic safetensors, the same bytes every time: seeded) is written
   once under the user's cache, ``$XDG_CACHE_HOME/weightd-demo``, and read from there as
   a ``file://`` source: its name and its files' identities stay the same across runs
   (a fixed TCP port could be taken; a path cannot), so a second run is a warm node;
2. ``weightd serve`` starts on its defaults (cache and socket), its log in a file;
3. the model is fetched through the daemon: the daemon's answer says how many bytes
   it read from the source (all of them the first time, none after);
4. it is pinned on the host tier (mapped and locked in memory by the daemon);
5. N replicas load it through ``weightd_client`` at the same moment: each one's time to
   ready, then the summed PSS of the replicas and the daemon against the model's size;
6. one replica loads the same files with ``safetensors.torch.load_file``: the baseline;
7. the pin is dropped (unless it was there before) and the daemon stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from weightd.config import (
    Config,
    ConfigError,
    arg_type,
    format_size,
    load_config,
    parse_size,
    user_cache_home,
)
from weightd.errors import WeightdError
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb

MiB = 1024 * 1024
SEED = 42
#: Bounds on every wait of the demo (a replica's imports on a loaded 2-core machine).
START_TIMEOUT = 300.0
STEP_TIMEOUT = 120.0


def _positive(v: str) -> int:
    if not v.isdigit() or int(v) < 1:
        raise ConfigError(f"not a number of replicas: {v!r} (use 1 or more)")
    return int(v)


def _say(text: str = "") -> None:
    print(text, flush=True)


def _label(nbytes: int) -> str:
    return f"{nbytes // MiB}MiB" if nbytes % MiB == 0 else f"{nbytes}B"


def demo_model(root: Path, nbytes: int) -> tuple[Path, bool]:
    """The demo model's directory under ``root``, written once (atomically: a directory
    renamed into place) and the same bytes every time. Returns (path, written now)."""
    from weightd.testing.models import write_synthetic_model

    path = root / f"synthetic-{_label(nbytes)}-seed{SEED}"
    if (path / "config.json").exists():
        return path, False
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{path.name}.{os.getpid()}.tmp"
    write_synthetic_model(tmp, total_bytes=nbytes, tensors=200, shards=2, seed=SEED)
    try:
        tmp.rename(path)
    except OSError:  # another demo wrote it meanwhile: the same bytes, keep theirs
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return path, True


class Replica:
    """A ``weightd.demo_replica`` process, driven one line at a time."""

    def __init__(self, how: str, where: str, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "weightd.demo_replica", how, where, name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def event(self, timeout: float) -> dict[str, Any]:
        out: IO[str] | None = self.proc.stdout
        assert out is not None
        ready, _, _ = select.select([out], [], [], timeout)
        line = out.readline() if ready else ""
        if not line:
            raise RuntimeError(f"{self.name} (pid {self.pid}) "
                               + ("exited" if ready else f"did not answer in {timeout:.0f}s")
                               + f"; exit code {self.proc.poll()}")
        return dict(json.loads(line))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send()  # the last line: let go of the weights and exit
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)


def _pss(pid: int) -> dict[str, int]:
    from weightd.testing.procfs import smaps_rollup

    return {k: v * 1024 for k, v in smaps_rollup(pid).items()}


class Daemon:
    """The daemon the demo talks to: one already serving on the socket, or one it
    starts, its log in a file."""

    def __init__(self, config: Config, log_path: Path) -> None:
        from weightd.testing.daemon import wait_for_daemon

        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = False
        if not self._answers():
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "wb") as log:
                self.proc = subprocess.Popen([sys.executable, "-m", "weightd.cli", "serve"],
                                             stdout=log, stderr=subprocess.STDOUT)
            self.started = True
            try:
                wait_for_daemon(config.socket, self.proc, timeout=STEP_TIMEOUT)
            except RuntimeError as e:
                self.stop()
                tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise SystemExit(f"weightd demo: {e}; its log {log_path} ends:\n  "
                                 + "\n  ".join(tail)) from e
        import grpc

        from weightd_client._proto.weightd.v1 import weightd_pb2_grpc as pb_grpc
        from weightd_client.credentials import CredentialInterceptor

        self.channel = grpc.insecure_channel(f"unix://{config.socket}")
        # Pin and Unpin need this process's credentials (the daemon logs who pinned)
        self.stub = pb_grpc.WeightdStub(grpc.intercept_channel(
            self.channel, CredentialInterceptor(config.socket)))
        self.pid = int(self.call("Status").pid)

    def _answers(self) -> bool:
        import weightd_client

        if not Path(self.config.socket).exists():
            return False
        try:
            with weightd_client.Client(self.config.socket, timeout=5) as c:
                c.status()
        except weightd_client.errors.DaemonUnavailable:
            return False
        return True

    def call(self, method: str, timeout: float = STEP_TIMEOUT, **fields: Any) -> Any:
        """A unary call, its error translated to weightd's classes."""
        import grpc

        from weightd_client.client import error_from_rpc

        request = getattr(pb, f"{method}Request")(**fields)
        try:
            return getattr(self.stub, method)(request, timeout=timeout)
        except grpc.RpcError as e:
            raise error_from_rpc(e, socket=str(self.config.socket), method=method) from e

    def fetch(self, source: str) -> Any:
        """Fetch through the daemon with a progress bar; the daemon's last message
        (files, hits, bytes read from the source, seconds)."""
        import grpc

        from weightd.progress import progress_for
        from weightd_client.client import error_from_rpc

        cb = progress_for(Path(source).name)
        done = 0
        try:
            for msg in self.stub.Fetch(pb.FetchRequest(source=source), timeout=3600):
                if msg.done:
                    if msg.bytes_fetched > done:  # the last stretch: the bar ends full
                        if not cb.size:  # a fetch so fast that no message came before
                            cb.set_size(msg.bytes_fetched)
                        cb.relative_update(msg.bytes_fetched - done)
                    return msg
                if msg.bytes_total and cb.size != msg.bytes_total:
                    cb.set_size(msg.bytes_total)
                if msg.bytes_done > done:  # a warm fetch moves no bytes: no progress line
                    cb.relative_update(msg.bytes_done - done)
                    done = msg.bytes_done
        except grpc.RpcError as e:
            raise error_from_rpc(e, socket=str(self.config.socket), method="Fetch") from e
        finally:
            getattr(cb, "close", lambda: None)()
        raise WeightdError(f"{source}: the daemon ended the fetch before it was done")

    def warnings(self) -> list[str]:
        if not self.started:
            return []
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if " WARNING " in line or " ERROR " in line]

    def stop(self) -> int | None:
        if hasattr(self, "channel"):
            self.channel.close()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def _bytes(n: int) -> str:
    return "0 bytes" if n == 0 else format_size(n)


def _ratio(part: float, whole: float) -> str:
    return f"{part / whole:.2f} × the model" if whole else "-"


def run(ns: argparse.Namespace) -> int:
    config = load_config()
    nbytes = ns.size
    home = user_cache_home() / "weightd-demo"
    t0 = time.perf_counter()
    path, written = demo_model(home / "models", nbytes)
    source = "file://" + str(path)
    _say(f"weightd demo: {ns.replicas} replicas of one model on this node\n"
         f"  cache  {config.cache_dir}\n  socket {config.socket}\n"
         f"  model  {source}\n"
         f"         {format_size(nbytes)} in 2 shards, 200 tensors; "
         + (f"written now in {time.perf_counter() - t0:.1f}s (the same bytes every run)"
            if written else "written by an earlier run (the same bytes every run)"))
    daemon = Daemon(config, home / "daemon.log")
    replicas: list[Replica] = []
    baseline: Replica | None = None
    pinned_here = False
    try:
        _say(f"  daemon pid {daemon.pid}, "
             + (f"its log: {daemon.log_path}" if daemon.started else
                "already running (its log is its own)"))

        _say("\n1. fetch into the node's cache, through the daemon")
        got = daemon.fetch(source)
        model_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        if got.bytes_fetched:
            _say(f"   {format_size(got.bytes_fetched)} from the source in {got.seconds:.2f}s "
                 f"({_ratio(got.bytes_fetched, model_bytes)}), {got.files} files")
        else:
            _say(f"   0 bytes from the source: all {got.files} files were in the cache "
                 f"(a listing, {got.seconds * 1000:.0f} ms)")

        _say("2. pin it on the host tier: the daemon maps it and locks it in memory")
        had_pin = any(p.model == got.model and p.tier == pb.TIER_HOST
                      for p in daemon.call("Status").pins)
        t1 = time.perf_counter()
        daemon.call("Pin", source=source)
        pinned_here = not had_pin
        state = _wait_resident(daemon, got.model)
        _say(f"   {state} after {(time.perf_counter() - t1) * 1000:.0f} ms")

        env = {**os.environ, "WEIGHTD_SOCKET": str(config.socket)}
        replicas = [Replica("weightd", source, f"weightd-demo replica {i + 1}", env)
                    for i in range(ns.replicas)]
        # the baseline reads the model's own files, as a replica without weightd would
        baseline = Replica("load_file", str(path), "weightd-demo baseline", env)
        everyone = [*replicas, baseline]
        for r in everyone:
            r.event(START_TIMEOUT)  # imported torch and the loaders
        before = {r.pid: _pss(r.pid) for r in everyone}

        _say(f"3. {ns.replicas} replicas start at the same moment and load it through "
             "weightd_client")
        for r in replicas:
            r.send()
        ready = [r.event(STEP_TIMEOUT) for r in replicas]
        after = {r.pid: _pss(r.pid) for r in replicas}
        daemon_pss = _pss(daemon.pid)
        for r, e in zip(replicas, ready, strict=True):
            _say(f"   replica {r.name.rsplit(' ', 1)[-1]} (pid {r.pid}): {e['tensors']} "
                 f"tensors, {format_size(e['bytes'])}: ready in {e['ready_ms']:.1f} ms, "
                 f"every page read after {e['read_ms']:.0f} ms")
        added = sum(after[r.pid]["Pss"] - before[r.pid]["Pss"] for r in replicas)
        total = added + daemon_pss["Pss"]
        _say(f"   memory while all {ns.replicas} hold every page (PSS, /proc/PID/smaps_rollup):")
        _say(f"     replicas, added by loading  {format_size(added):>10}")
        _say(f"     daemon, whole process       {format_size(daemon_pss['Pss']):>10}  "
             f"(its own heap {format_size(daemon_pss.get('Pss_Anon', 0))})")
        _say(f"     sum                         {format_size(total):>10}  = "
             f"{_ratio(total, model_bytes)} ({format_size(model_bytes)}) for "
             f"{ns.replicas} replicas")

        _say("4. baseline: one replica loads the model's files with safetensors.torch.load_file")
        baseline.send()
        base = baseline.event(STEP_TIMEOUT)
        base_added = _pss(baseline.pid)["Pss"] - before[baseline.pid]["Pss"]
        _say(f"   ready in {base['ready_ms']:.1f} ms, every page read after "
             f"{base['read_ms']:.0f} ms; added {format_size(base_added)} to its PSS = "
             f"{_ratio(base_added, model_bytes)}, for one replica")
        same = len({e["checksum"] for e in [*ready, base]}) == 1
        times = [e["ready_ms"] for e in ready]
        _say("\nin short:")
        _say(f"  source   {_bytes(got.bytes_fetched)} from the source this run "
             + (f"({_ratio(got.bytes_fetched, model_bytes)})" if got.bytes_fetched
                else "(a warm node: the cache had every file)"))
        _say(f"  weightd  {ns.replicas} replicas ready in {statistics.median(times):.1f} ms "
             f"(median; {min(times):.1f}-{max(times):.1f}), all of them and the daemon "
             f"{_ratio(total, model_bytes)}")
        _say(f"  baseline load_file ready in {base['ready_ms']:.1f} ms, "
             f"{_ratio(base_added, model_bytes)} for its one replica")
        _say("  weights  " + ("the same bytes in every replica and the baseline"
                              if same else "DIFFER between replicas: a bug, please report"))
        disk = next(t for t in daemon.call("Status").tiers if t.device == "disk")
        _say(f"  cache    {format_size(disk.bytes_used)} of blobs in {config.cache_dir}")
        return 0 if same else 1
    finally:
        for r in [*replicas, *([baseline] if baseline else [])]:
            r.close()
        if pinned_here:
            try:
                daemon.call("Unpin", source=source)
            except WeightdError as e:
                _say(f"(could not drop the demo's pin: {e})")
        warnings = daemon.warnings()
        code = daemon.stop()
        if daemon.started:
            _say(f"\ndaemon stopped (exit {code}); {len(warnings)} warnings in its log "
                 f"{daemon.log_path}")
            for line in warnings:
                _say(f"  {line}")


def _wait_resident(daemon: Daemon, model: str) -> str:
    deadline = time.monotonic() + STEP_TIMEOUT
    while time.monotonic() < deadline:
        for p in daemon.call("Status").pins:
            if p.model == model and p.tier == pb.TIER_HOST and (
                    p.state == "resident" or p.state.startswith("failed")):
                if p.state != "resident":
                    raise WeightdError(f"{model}: the pin {p.state}")
                return "resident"
        time.sleep(0.02)
    raise WeightdError(f"{model}: not resident after {STEP_TIMEOUT:.0f}s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weightd.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=arg_type("replicas", _positive), default=4,
                        metavar="N", help="replicas that load the model (default: 4)")
    parser.add_argument("--size", type=arg_type("size", parse_size), default=256 * MiB,
                        metavar="SIZE", help="size of the demo model (default: 256MiB)")
    ns = parser.parse_args(argv)
    try:
        return run(ns)
    except (WeightdError, ConfigError, RuntimeError) as e:
        print(f"weightd demo: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
