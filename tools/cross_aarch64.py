"""Cross-build HyperNAT's Cython extensions for aarch64 against an arm64 Debian root.

    python tools/cross_aarch64.py ROOT TREE [C_FILE ...]

ROOT is the root tools/arm64-root.sh makes; TREE a copy of the source tree (inside ROOT,
so the tests can run there under qemu).  Every extension the x86-64 build makes is built
into TREE as ``<module path><the root's EXT_SUFFIX>``: the list, sources, macros and flags
are setup.py's own (setup.py runs in TREE with ``setuptools.setup`` replaced, so nothing
here repeats it; HYPERNAT_COMPILE_PY=0 leaves the compiled slow path out of that list).
Cython generates the C in TREE with the root's numpy ``.pxd`` first on its include path,
so the C matches the numpy headers it is compiled against (the host's numpy may be another
major version).  Each C_FILE (the slow-path modules setup.py compiles, generated on the
host) is compiled for aarch64 but not linked: an x86-only construct fails here.

The compiler is ``$CROSS`` (default aarch64-linux-gnu-gcc, possibly behind ccache) with ``--sysroot=ROOT``: the
root's libc, Python and numpy headers and its libraries, and the compile and link flags
the root's Python builds extensions with (its sysconfig CFLAGS, CCSHARED, LDSHARED), as
setuptools would use them there.  Every object must be an aarch64 ELF.  Prints one line per
module built; exits non-zero, naming the file and the compiler's output, on any failure.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import runpy
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CROSS = shlex.split(os.environ.get("CROSS", "aarch64-linux-gnu-gcc"))  # may start with ccache
TIMEOUT = 900  # seconds per compiler run (the biggest slow-path module takes ~1 min)
ROOT_INFO = r"""
import json, os, sysconfig, numpy
v = sysconfig.get_config_var
print(json.dumps({"include": sysconfig.get_paths()["include"], "numpy_include": numpy.get_include(),
                  "numpy_site": os.path.dirname(os.path.dirname(numpy.__file__)),
                  "ext_suffix": v("EXT_SUFFIX"), "cflags": v("CFLAGS").split() + v("CCSHARED").split(),
                  "ldflags": v("LDSHARED").split()[1:]}))
"""


class BuildError(Exception):
    pass


def root_info(root: str) -> dict:
    """The root's Python, asked inside the root (under qemu)."""
    r = subprocess.run(["bash", os.path.join(HERE, "arm64-root.sh"), "run", "python3", "-c", ROOT_INFO],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise BuildError(f"the root's python3 does not answer:\n{r.stderr}")
    info = json.loads(r.stdout)
    if "aarch64" not in info["ext_suffix"]:
        raise BuildError(f"the root's Python is not aarch64 (EXT_SUFFIX {info['ext_suffix']})")
    return info


def extensions(tree: str, numpy_site: str) -> list:
    """setup.py's extensions, run in `tree`, with Cython looking in `numpy_site` first."""
    import Cython.Build
    import setuptools

    got, cythonize, setup, cwd = {}, Cython.Build.cythonize, setuptools.setup, os.getcwd()

    def cythonize_for_root(*args, **kw):
        kw["include_path"] = [numpy_site] + list(kw.get("include_path") or [])
        return cythonize(*args, **dict(kw, force=True))

    env = {k: os.environ.get(k) for k in ("HYPERNAT_COMPILE_PY", "HYPERNAT_BUILD_ONLY")}
    os.environ.update(HYPERNAT_COMPILE_PY="0", HYPERNAT_BUILD_ONLY="")
    Cython.Build.cythonize, setuptools.setup = cythonize_for_root, lambda **kw: got.update(kw)
    try:
        os.chdir(tree)
        runpy.run_path("setup.py", run_name="__main__")
    finally:
        os.chdir(cwd)
        Cython.Build.cythonize, setuptools.setup = cythonize, setup
        for k, v in env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return got["ext_modules"]


def run(cmd: list, what: str, cwd: str) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    if r.returncode != 0:
        raise BuildError(f"{what}: {' '.join(cmd)}\n{r.stdout[-4000:]}{r.stderr[-8000:]}")


def compile_c(root: str, info: dict, src: str, obj: str, flags: list, cwd: str) -> None:
    run([*CROSS, f"--sysroot={root}", *info["cflags"], "-Werror=implicit-function-declaration",
         f"-I{root}{info['include']}", *flags, "-c", src, "-o", obj], src, cwd)
    kind = subprocess.run(["file", "-b", obj], capture_output=True, text=True, timeout=60).stdout
    if "ARM aarch64" not in kind:
        raise BuildError(f"{src}: not an aarch64 object: {kind.strip()}")


def build(root: str, tree: str, c_files: list) -> list:
    """Build the extensions into `tree` and compile `c_files`; returns the module names."""
    import numpy

    info = root_info(root)
    exts = extensions(tree, root + info["numpy_site"])
    if not exts:
        raise BuildError("setup.py declares no extension")
    objdir = os.path.join(tree, "build", "aarch64")
    os.makedirs(objdir, exist_ok=True)

    def one_ext(e):
        (src,) = e.sources
        incs = [root + info["numpy_include"] if d == numpy.get_include() else d for d in e.include_dirs]
        macros = [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in e.define_macros]
        obj = os.path.join(objdir, e.name + ".o")
        compile_c(root, info, src, obj, [f"-I{d}" for d in incs] + macros + list(e.extra_compile_args), tree)
        so = os.path.join(tree, *e.name.split(".")) + info["ext_suffix"]
        run([CROSS[-1], f"--sysroot={root}", "-shared", *info["ldflags"], obj, *e.extra_link_args, "-o", so],
            f"link {e.name}", tree)
        return f"{e.name} built for aarch64"

    def one_c(c):
        # -Wno-array-bounds as setup.py (gcc's false positives on Cython's None comparisons)
        obj = os.path.join(objdir, c.replace(os.sep, ".")[:-2] + ".o")
        compile_c(root, info, os.path.abspath(c), obj, ["-Wno-unused-function", "-Wno-array-bounds"], tree)
        return f"{c} compiles for aarch64"

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the big slow-path modules: 2 at a time
        jobs = [pool.submit(one_ext, e) for e in exts] + [pool.submit(one_c, c) for c in c_files]
        for job in jobs:
            print(f"portability: {job.result()}", flush=True)
    return [e.name for e in exts]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    root, tree, c_files = argv[0], argv[1], argv[2:]
    try:
        names = build(os.path.abspath(root), os.path.abspath(tree), c_files)
    except (BuildError, subprocess.TimeoutExpired, OSError) as exc:
        print(f"portability: aarch64 build failed: {exc}", file=sys.stderr)
        return 1
    with open(os.path.join(tree, "build", "aarch64", "modules"), "w") as f:
        f.write("\n".join(names) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
