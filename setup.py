"""Build of hypernat and its Cython extensions.

Every ``hypernat/**/*.pyx`` becomes an extension.  A .pyx whose first lines carry
``# hypernat: requires=PKG[,PKG]`` is built only where pkg-config finds those packages
(the AF_XDP backend needs libxdp and libbpf); elsewhere it is skipped with a message.

Switches (environment):
  HYPERNAT_DEBUG=1        bounds/wraparound checks on, -O0 -g, assertions kept
  HYPERNAT_ANNOTATE=1     write Cython's annotated HTML beside each .pyx
  HYPERNAT_CFLAGS="..."   extra C flags (CI adds -funsigned-char to mimic ARM's char)
  HYPERNAT_BUILD_ONLY=a,b build only these modules (e.g. hypernat._fastpath)
No -march=native: the same sources build on x86-64 and aarch64 (BlueField).
"""
import glob
import os
import runpy
import shlex
import subprocess
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("HYPERNAT_DEBUG", "") not in ("", "0")
ANNOTATE = os.environ.get("HYPERNAT_ANNOTATE", "") not in ("", "0")
ONLY = {m for m in os.environ.get("HYPERNAT_BUILD_ONLY", "").split(",") if m}


def write_verdicts_pxi():
    """Expand the one declared list of verdicts into the Cython enum."""
    mod = runpy.run_path(os.path.join(HERE, "hypernat", "verdicts.py"))
    path = os.path.join(HERE, "hypernat", "_verdicts.pxi")
    text = mod["pxi_source"]()
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def pkg_config(pkgs):
    try:
        cflags = subprocess.run(["pkg-config", "--cflags"] + pkgs, capture_output=True, text=True, check=True).stdout
        libs = subprocess.run(["pkg-config", "--libs"] + pkgs, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return shlex.split(cflags), shlex.split(libs)


def requirements_of(pyx):
    with open(pyx) as f:
        for _, line in zip(range(5), f):
            if line.startswith("# hypernat: requires="):
                return line.split("=", 1)[1].strip().split(",")
    return []


def extensions():
    extra = shlex.split(os.environ.get("HYPERNAT_CFLAGS", ""))
    cflags = ["-O0", "-g"] if DEBUG else ["-O3"]
    exts = []
    for pyx in sorted(glob.glob("hypernat/**/*.pyx", recursive=True)):
        name = pyx[:-4].replace(os.sep, ".")
        if ONLY and name not in ONLY:
            continue
        ccflags, libs = [], []
        reqs = requirements_of(pyx)
        if reqs:
            found = pkg_config(reqs)
            if found is None:
                print(f"hypernat: skipping {name}: pkg-config does not find {', '.join(reqs)}", file=sys.stderr)
                continue
            ccflags, libs = found
        exts.append(
            Extension(
                name,
                [pyx],
                include_dirs=[numpy.get_include()],
                extra_compile_args=cflags + ["-Wno-unused-function"] + ccflags + extra,
                extra_link_args=libs,
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
                + ([("HYPERNAT_DEBUG", "1")] if DEBUG else [("CYTHON_WITHOUT_ASSERTIONS", "1")]),
            )
        )
    directives = {
        "language_level": 3,
        "boundscheck": DEBUG,
        "wraparound": DEBUG,
        "initializedcheck": DEBUG,
        "cdivision": True,
        "embedsignature": True,
    }
    return cythonize(
        exts,
        compiler_directives=directives,
        annotate=ANNOTATE,
        compile_time_env={"HYPERNAT_DEBUG": DEBUG},
        force=DEBUG or ANNOTATE,
    )


class atomic_build_ext(build_ext):
    """`--inplace` copies each built module beside its sources.  Copy to a temporary
    name and rename, so a process that has the old module mapped (a running daemon, a
    test run) keeps its file instead of seeing it rewritten under it."""

    def copy_file(self, infile, outfile, *args, **kwargs):
        if not outfile.endswith((".so", ".pyd")):
            return super().copy_file(infile, outfile, *args, **kwargs)
        tmp = f"{outfile}.tmp{os.getpid()}"
        super().copy_file(infile, tmp, *args, **kwargs)
        os.replace(tmp, outfile)
        return outfile, 1


write_verdicts_pxi()

setup(
    name="hypernat",
    version="0.1.0",
    description="HyperNAT: a cloud NAT gateway scaled up over several packet-processing units",
    packages=find_packages(include=["hypernat", "hypernat.*"]),
    package_data={"hypernat": ["*.pxd", "*.pxi", "**/*.pxd"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": atomic_build_ext},
    python_requires=">=3.9",
    install_requires=["numpy", "pyzmq", "pyyaml", "prometheus_client"],
    entry_points={
        "console_scripts": [
            "hypernat=hypernat.cli:main",
            "hypernat-nic=hypernat.nic.__main__:main",
            "hypernat-coord=hypernat.coord.__main__:main",
        ]
    },
)
