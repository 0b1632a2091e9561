"""Build the compiled hot paths (ext/*.pyx) into the package.

FASTMTA_NO_EXTENSIONS=1 skips them: the package then runs on its pure-Python twin
(fastmta/protocol/_parse_py.py, fastmta/spool/_io_py.py) and says so in `fastmta --version`.
"""

import os

from setuptools import setup

ext_modules = []
if os.environ.get("FASTMTA_NO_EXTENSIONS", "") not in ("1", "true", "yes"):
    from Cython.Build import cythonize
    from setuptools import Extension

    ext_modules = cythonize(
        [
            Extension("fastmta.protocol._parse", ["ext/_parse.pyx"], extra_compile_args=["-O3"]),
            Extension("fastmta.spool._io", ["ext/_spoolio.pyx"], extra_compile_args=["-O3"]),
        ],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        },
    )

setup(ext_modules=ext_modules)
