"""``fastmta bench e2e|ingest|drain|all [--smoke]``: the benchmarks against Postfix, from the CLI.

The benchmarks live in ``benchmarks/`` of a source checkout (they need Postfix's smtp-source
and smtp-sink, and start a private Postfix instance); this module finds that directory next to
the package and runs ``bench_ingest.py`` / ``bench_e2e.py`` / ``bench_drain.py`` with the same
interpreter, passing the options on. Exit status: 0 when every run succeeded, 1 when one failed,
69 (EX_UNAVAILABLE) when the benchmarks or the Postfix tools are missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

__all__ = ["benchmarks_dir", "main"]

EX_UNAVAILABLE = 69


def benchmarks_dir() -> str | None:
    """The ``benchmarks/`` directory of the source checkout this package runs from, or None."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(os.path.dirname(here), "benchmarks")
    return path if os.path.isfile(os.path.join(path, "bench_e2e.py")) else None


def main(args: argparse.Namespace) -> int:
    """Run the chosen benchmarks (``args.which``: e2e, ingest, drain or all) in order; return
    status."""
    where = benchmarks_dir()
    if where is None:
        print("fastmta: bench: benchmarks/ not found (run from a source checkout)", file=sys.stderr)
        return EX_UNAVAILABLE
    if shutil.which("smtp-source") is None and not os.path.exists("/usr/sbin/smtp-source"):
        print("fastmta: bench: smtp-source (Postfix) is not installed", file=sys.stderr)
        return EX_UNAVAILABLE
    which = getattr(args, "which", None) or "all"
    every = ["bench_ingest.py", "bench_e2e.py", "bench_drain.py"]
    names = every if which == "all" else [f"bench_{which}.py"]
    opts: list[str] = []
    if getattr(args, "smoke", False):
        opts.append("--smoke")
    if getattr(args, "workers", None):
        opts += ["--workers", args.workers]
    if getattr(args, "no_postfix", False):
        opts.append("--no-postfix")
    if getattr(args, "no_write", False):
        opts.append("--no-write")
    if getattr(args, "repeat", 1) and args.repeat > 1:
        opts += ["--repeat", str(args.repeat)]
    env = dict(os.environ)
    env["PATH"] = env.get("PATH", "") + os.pathsep + "/usr/sbin"
    status = 0
    for name in names:
        # Each benchmark is bounded by its own timeouts; 2 h is the outer bound of a full run.
        r = subprocess.run(
            [sys.executable, os.path.join(where, name), *opts], env=env, timeout=7200
        )
        status = status or (1 if r.returncode else 0)
    return status
