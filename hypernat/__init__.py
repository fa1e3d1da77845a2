"""HyperNAT: a cloud NAT gateway scaled up over several packet-processing units.

See README.md for the architecture; `hypernat.fastpath` for the per-packet engine.

Compiled slow path
------------------
setup.py compiles a few plain-Python modules (``COMPILED_PY`` there: the RuleAgent, the
RuleBuilder, the messages, ...) with Cython, as they are, into ordinary extension
modules beside their sources (``hypernat/rules.py`` -> ``hypernat/rules<EXT_SUFFIX>``):
Python's own path finder loads an extension module in preference to the .py of the same
name, so nothing here changes how modules are found.  ``HYPERNAT_COMPILE_PY=0`` builds
none of them (and an in-place build removes earlier ones): everything runs from source.

Each build has ``<build>.sha256`` beside it, the sha256 of the .py it was built from.  A
build whose .py was edited since would shadow the edit, so importing this package
checks the stamps (``stale_builds()``) and refuses to go on with a stale one: an
ImportError naming the module and ``make build``.  ``compiled_modules()`` names the
hypernat modules imported so far that run compiled from a .py of this tree.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"

_HERE = _os.path.dirname(_os.path.abspath(__file__))


def _stamps():
    """(build, stamp file) of every compiled .py module of this tree."""
    import importlib.machinery

    suffix = importlib.machinery.EXTENSION_SUFFIXES[0] + ".sha256"
    for d, _, files in _os.walk(_HERE):
        for f in files:
            if f.endswith(suffix):
                yield _os.path.join(d, f[: -len(".sha256")]), _os.path.join(d, f)


def stale_builds() -> list:
    """[(module name, build, source)] of the builds older than their .py (the stamp
    names another sha256) or whose .py is gone."""
    import hashlib

    out = []
    for so, stamp in _stamps():
        if not _os.path.exists(so):
            continue
        base = so[: -len(so.rsplit("/", 1)[-1])] + _os.path.basename(so).split(".", 1)[0]
        src = base + ".py"
        try:
            with open(stamp) as f:
                want = f.read().split()[0]
            with open(src, "rb") as f:
                got = hashlib.sha256(f.read()).hexdigest()
        except (OSError, IndexError):
            want, got = "", None
        if want != got:
            rel = _os.path.relpath(base, _os.path.dirname(_HERE))
            out.append((rel.replace(_os.sep, "."), so, src))
    return out


def compiled_modules() -> tuple:
    """The hypernat modules imported so far that run compiled from a .py (sorted)."""
    out = []
    for name, m in list(_sys.modules.items()):
        f = getattr(m, "__file__", None) or ""
        if name.startswith("hypernat.") and not f.endswith(".py") and f:
            stem = f[: -len(_os.path.basename(f))] + _os.path.basename(f).split(".", 1)[0]
            if _os.path.exists(stem + ".py"):
                out.append(name)
    return tuple(sorted(out))


_stale = stale_builds()
if _stale:
    raise ImportError(
        "hypernat: compiled build older than its source (it would run instead of the edited .py): "
        + "; ".join(f"{name} ({_os.path.relpath(so)} vs {_os.path.relpath(src)})" for name, so, src in _stale)
        + ": run `make build` (or `HYPERNAT_COMPILE_PY=0 python setup.py build_ext --inplace` to drop the builds)")
del _stale
