"""Shared fixtures. Every parser test runs on both implementations (ids "c" and "py")."""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile

import pytest


def _compiled():
    try:
        return importlib.import_module("fastmta.protocol._parse")
    except ImportError:
        if os.environ.get("CI") == "true":
            raise  # CI builds the extension: its absence is a failure there
        return None


@pytest.fixture(params=["c", "py"])
def impl(request):
    """The parser module under test: the compiled one ("c") or the pure-Python twin ("py")."""
    if request.param == "py":
        return importlib.import_module("fastmta.protocol._parse_py")
    mod = _compiled()
    if mod is None:
        pytest.skip("compiled parser not built (python setup.py build_ext --inplace)")
    return mod


@pytest.fixture
def tmp():
    """A short directory: a control socket path (under it) must fit in 107 bytes (sun_path)."""
    path = tempfile.mkdtemp(prefix="fmq-")
    yield path
    shutil.rmtree(path, ignore_errors=True)
