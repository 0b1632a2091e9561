"""Benchmark fixtures: the parser under test ("c" compiled, "py" the twin), smoke mode, and
a closing summary of rates and c/py ratios.

``--smoke`` or FASTMTA_BENCH_SMOKE=1 runs every benchmark once (one round, no warm-up):
enough to prove the benchmarks work, in CI, without measuring anything.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

import pytest

# (group, impl) -> (units per call, unit name, mean seconds per call)
RESULTS: dict[tuple[str, str], tuple[float, str, float]] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--smoke",
        action="store_true",
        default=False,
        help="run each benchmark once, minimal rounds (also FASTMTA_BENCH_SMOKE=1)",
    )


def _smoke(config: pytest.Config) -> bool:
    return config.getoption("--smoke") or os.environ.get("FASTMTA_BENCH_SMOKE", "") in (
        "1",
        "true",
        "yes",
    )


@pytest.fixture(params=["c", "py"])
def impl(request: pytest.FixtureRequest) -> Any:
    """The parser module under test: compiled ("c") or the pure-Python twin ("py")."""
    if request.param == "py":
        return importlib.import_module("fastmta.protocol._parse_py")
    try:
        return importlib.import_module("fastmta.protocol._parse")
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("compiled parser not built (python setup.py build_ext --inplace)")


@pytest.fixture
def measure(benchmark: Any, request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``measure(group, units, unit, fn, *args)``: benchmark ``fn(*args)`` (one call handles
    ``units`` of ``unit``: lines, bytes, replies), record its rate for the summary."""
    smoke = _smoke(request.config)
    impl_id = request.node.callspec.params.get("impl", "?")

    def run(group: str, units: float, unit: str, fn: Callable[..., Any], *args: Any) -> Any:
        benchmark.group = group
        benchmark.extra_info["unit"] = unit
        if smoke:
            result = benchmark.pedantic(fn, args=args, rounds=1, iterations=1, warmup_rounds=0)
        else:
            result = benchmark(fn, *args)
        stats = getattr(benchmark, "stats", None)
        if stats is not None and not smoke:
            mean = stats.stats.mean
            benchmark.extra_info[f"{unit}/s"] = units / mean
            RESULTS[(group, impl_id)] = (units, unit, mean)
        return result

    return run


def _fmt(rate: float, unit: str) -> str:
    if unit == "bytes":
        return f"{rate / 1e6:10.1f} MB/s"
    return f"{rate:12,.0f} {unit}/s"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("parser throughput (c vs py)")
    rows = []
    for group in sorted({g for g, _ in RESULTS}):
        c, py = RESULTS.get((group, "c")), RESULTS.get((group, "py"))
        parts = []
        for name, r in (("c", c), ("py", py)):
            if r:
                parts.append(f"{name}: {_fmt(r[0] / r[2], r[1])}")
        ratio = f"  c/py = {py[2] / c[2]:6.1f}x" if c and py else ""
        tr.write_line(f"{group:28s} " + "   ".join(parts) + ratio)
        if c and py:
            rows.append([group, _fmt(c[0] / c[2], c[1]), _fmt(py[0] / py[2], py[1]),
                         f"{py[2] / c[2]:.1f}x"])  # fmt: skip
    opt = tr.config.option
    whole = not opt.keyword and not opt.markexpr and not any("::" in a for a in tr.config.args)
    if whole and rows and len(rows) == len({g for g, _ in RESULTS}):  # every case, both: keep it
        import harness as h  # noqa: PLC0415 - benchmarks/ is on sys.path under pytest

        text = (
            "## Parser: compiled (c) vs pure-Python twin (py)\n\n"
            f"{h.machine_md()}\n- pytest-benchmark means, "
            "`python -m pytest benchmarks/bench_parse.py --benchmark-enable`\n\n"
            + h.md_table(["case", "c", "py", "c/py"], [[f"`{r[0]}`", *r[1:]] for r in rows])
            + "\n"
        )
        h.write_section("parser", text)
        tr.write_line(f"(written to {h.RESULTS_MD})")
