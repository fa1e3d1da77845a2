"""Build of hypernat and its Cython extensions.

Every ``hypernat/**/*.pyx`` becomes an extension.  So do the plain-Python slow-path
modules listed in ``COMPILED_PY``, compiled as they are by Cython (the .py stays the one
source): each is an ordinary extension module built beside its source
(``hypernat/rules.py`` -> ``hypernat/rules<EXT_SUFFIX>``), which Python's own import
system loads in preference to the .py (an extension module comes before source in the
path finder's order).  Beside each such build goes ``<build>.sha256``, the sha256 of the
.py it was built from: ``import hypernat`` refuses to run with a build older than its
.py (ImportError naming the module and ``make build``), so an edit is never shadowed by
an old build.  A .pyx whose first lines carry
``# hypernat: requires=PKG[,PKG]`` is built only where pkg-config finds those packages
(the AF_XDP backend needs libxdp and libbpf); elsewhere it is skipped with a message.

Switches (environment):
  HYPERNAT_DEBUG=1        bounds/wraparound checks on, -O0 -g, assertions kept
  HYPERNAT_ANNOTATE=1     write Cython's annotated HTML beside each .pyx
  HYPERNAT_CFLAGS="..."   extra C flags (CI adds -funsigned-char to mimic ARM's char)
  HYPERNAT_BUILD_ONLY=a,b build only these modules (e.g. hypernat._fastpath, hypernat.agent.core;
                          `none`: no extension, as the Makefile's editable install)
  HYPERNAT_COMPILE_PY=0   do not compile the COMPILED_PY modules: they run from their .py
                          (an --inplace build also removes their earlier builds)
No -march=native: the same sources build on x86-64 and aarch64 (BlueField).
"""
import glob
import hashlib
import os
import runpy
import shlex
import shutil
import subprocess
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from sysconfig import get_config_var

HERE = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("HYPERNAT_DEBUG", "") not in ("", "0")
ANNOTATE = os.environ.get("HYPERNAT_ANNOTATE", "") not in ("", "0")
ONLY = {m for m in os.environ.get("HYPERNAT_BUILD_ONLY", "").split(",") if m}
COMPILE_PY = os.environ.get("HYPERNAT_COMPILE_PY", "1") not in ("", "0")

# Plain-Python modules compiled as they are (per-connection slow path).  Kept only where
# bench_clone_throughput measured a gain (2026-11-26: the four slow-path modules +11 %
# clone installs/s in-process, worker/broker/memory a further ~+7 % with NIC processes);
# the biggest first (the build runs in parallel and these two take longest).  Left out:
# hypernat.io.base, hypernat.zmqio (no measurable gain: ~2 % and ~1 % of the time).
COMPILED_PY = [
    "hypernat.rules",
    "hypernat.agent.core",
    "hypernat.messages",
    "hypernat.partition",
    "hypernat.nic.worker",
    "hypernat.coord.broker",
    "hypernat.io.memory",
    # the owner side's concerns split out of hypernat.rules (per block event, per expired
    # session, per clone batch, per recovery report): compiled like rules was (not
    # hypernat.nat.records: a dtype and three key functions, no class)
    "hypernat.nat.pool",
    "hypernat.nat.expiry",
    "hypernat.nat.holder",
    "hypernat.nat.recovery",
]
OLD_COMPILED_DIR = os.path.join("hypernat", "_compiled")  # where builds went before: removed
EXT_SUFFIX = get_config_var("EXT_SUFFIX")
# Cython directives that keep a .py's Python semantics: annotations are NOT C types
# (with annotation typing on, `x: float` would turn 1 into 1.0 and refuse None, `n: int`
# would refuse a numpy integer); asserts stay (no CYTHON_WITHOUT_ASSERTIONS for these).
PY_DIRECTIVES = {"language_level": 3, "binding": True, "annotation_typing": False}


def write_verdicts_pxi():
    """Expand each one declared list (the fast path's verdicts, the wire's drop reasons)
    into its Cython enum."""
    for src, pxi in (("verdicts.py", "_verdicts.pxi"), ("wire_reasons.py", "_wire_reasons.pxi")):
        mod = runpy.run_path(os.path.join(HERE, "hypernat", src))
        path = os.path.join(HERE, "hypernat", pxi)
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


def source_of(name):
    return os.path.join(*name.split(".")) + ".py"


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def compiled_filename(name):
    """Where module `name`'s compiled build lives, relative to a tree or build_lib: beside its .py."""
    return os.path.join(*name.split(".")) + EXT_SUFFIX


def read_stamp(path):
    try:
        with open(path) as f:
            return f.read().split()[0]
    except (OSError, IndexError):
        return None


def py_extensions(cflags, extra):
    """The COMPILED_PY modules as extensions, each with the sha256 of its source."""
    exts, stale = [], []
    for name in COMPILED_PY if COMPILE_PY else []:
        if ONLY and name not in ONLY:
            continue
        src = source_of(name)
        ext = Extension(
            name,
            [src],
            # -Wno-array-bounds: gcc's false positives on Cython's inlined comparisons with None
            extra_compile_args=cflags + ["-Wno-unused-function", "-Wno-array-bounds"] + extra,
            define_macros=[("HYPERNAT_DEBUG", "1")] if DEBUG else [],
        )
        ext.hypernat_sha256 = sha256_of(src)
        ext.hypernat_source = src
        exts.append(ext)
        # Cython regenerates C by timestamps; the stamp must name the source the .so
        # was really built from, so regenerate whenever the tree's build is not of it.
        if read_stamp(compiled_filename(name) + ".sha256") != ext.hypernat_sha256:
            stale.append(ext)
    return exts, stale


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
    py_exts, stale = py_extensions(cflags, extra)
    out = []
    if stale:
        out += cythonize(stale, compiler_directives=PY_DIRECTIVES, annotate=ANNOTATE, force=True)
    fresh = [e for e in py_exts if e not in stale]
    if fresh:
        out += cythonize(fresh, compiler_directives=PY_DIRECTIVES, annotate=ANNOTATE, force=DEBUG or ANNOTATE)
    by_name = {e.name: e for e in py_exts}
    for e in out:  # cythonize may hand back new Extension objects
        e.hypernat_sha256, e.hypernat_source = by_name[e.name].hypernat_sha256, by_name[e.name].hypernat_source
    # the slow-path modules first: the longest compiles start first under -j
    out = sorted(out, key=lambda e: COMPILED_PY.index(e.name))
    if exts:
        out += cythonize(
            exts,
            compiler_directives=directives,
            annotate=ANNOTATE,
            compile_time_env={"HYPERNAT_DEBUG": DEBUG},
            force=DEBUG or ANNOTATE,
        )
    return out


def write_stamp(so_path, ext):
    """`<so>.sha256`: the sha256 of the source the .so was built from (sha256sum's format,
    checkable with `sha256sum -c` from the tree's root).  Written after the .so is in
    place: a reader that sees this stamp sees the .so it describes (or a newer one)."""
    tmp = f"{so_path}.sha256.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{ext.hypernat_sha256}  {ext.hypernat_source}\n")
    os.replace(tmp, so_path + ".sha256")


class atomic_build_ext(build_ext):
    """`--inplace` copies each built module beside its sources.  Copy to a temporary
    name and rename, so a process that has the old module mapped (a running daemon, a
    test run) keeps its file instead of seeing it rewritten under it.

    Each COMPILED_PY build is followed by its .sha256 stamp (in build_lib as in the
    tree).  A full in-place build removes the builds of .py modules it no longer
    compiles (not in COMPILED_PY, or HYPERNAT_COMPILE_PY=0): their .py runs again."""

    def _is_py(self, ext_name):
        return ext_name in COMPILED_PY

    def build_extension(self, ext):
        super().build_extension(ext)
        if self._is_py(ext.name):
            write_stamp(self.get_ext_fullpath(ext.name), ext)

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        root = os.path.dirname(build_py.get_package_dir("hypernat"))
        built = set()
        for ext in self.extensions:
            if self._is_py(ext.name):
                inplace_file, _ = self._get_inplace_equivalent(build_py, ext)
                write_stamp(inplace_file, ext)
                built.add(os.path.abspath(inplace_file))
        if not ONLY:  # a full build: drop builds of .py modules no longer compiled
            for py in glob.glob(os.path.join(root, "hypernat", "**", "*.py"), recursive=True):
                so = py[:-3] + EXT_SUFFIX
                if os.path.exists(py[:-3] + ".pyx"):
                    continue  # (no module has both; were there one, its build is the .pyx's)
                if os.path.exists(so) and os.path.abspath(so) not in built:
                    print(f"hypernat: removing {so} (not in COMPILED_PY, or HYPERNAT_COMPILE_PY=0)", file=sys.stderr)
                    for path in (so + ".sha256", so):
                        if os.path.exists(path):
                            os.remove(path)
            # builds of a .py that moved or went (hypernat/agent.py -> hypernat/agent/core.py)
            for stamp in glob.glob(os.path.join(root, "hypernat", "**", "*" + EXT_SUFFIX + ".sha256"), recursive=True):
                so = stamp[: -len(".sha256")]
                if not os.path.exists(so[: -len(EXT_SUFFIX)] + ".py"):
                    print(f"hypernat: removing {so} (its .py is gone)", file=sys.stderr)
                    for path in (stamp, so):
                        if os.path.exists(path):
                            os.remove(path)
            old = os.path.join(root, OLD_COMPILED_DIR)
            if os.path.isdir(old):  # the builds of the former import finder: never loaded now
                print(f"hypernat: removing {old} (builds now go beside their .py)", file=sys.stderr)
                shutil.rmtree(old)

    def get_outputs(self):
        outs = super().get_outputs()
        if not self.inplace:
            outs += [self.get_ext_fullpath(e.name) + ".sha256" for e in self.extensions if self._is_py(e.name)]
        return outs

    def copy_file(self, infile, outfile, *args, **kwargs):
        if not outfile.endswith((".so", ".pyd")):
            return super().copy_file(infile, outfile, *args, **kwargs)
        os.makedirs(os.path.dirname(outfile) or ".", exist_ok=True)
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
    # the compiles run in parallel (the two biggest slow-path modules take ~1 min each)
    options={"build_ext": {"parallel": max(1, min(4, os.cpu_count() or 1))}},
    python_requires=">=3.9",
    install_requires=["numpy", "pyzmq", "pyyaml", "prometheus_client"],
    entry_points={
        "console_scripts": [
            "hypernat=hypernat.cli:main",
            "hypernat-nic=hypernat.nic.__main__:main",
            "hypernat-coord=hypernat.coord.__main__:main",
            "hypernat-fleet=hypernat.fleet.speaker:main",
        ]
    },
)
