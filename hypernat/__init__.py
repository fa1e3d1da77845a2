"""HyperNAT: a cloud NAT gateway scaled up over several packet-processing units.

See README.md for the architecture; `hypernat.fastpath` for the per-packet engine.

Compiled slow path
------------------
setup.py compiles a few plain-Python modules (``COMPILED_PY`` there: the RuleAgent, the
RuleBuilder, the messages, ...) with Cython, as they are, into
``hypernat/_compiled/<module name><EXT_SUFFIX>`` (a file name with dots: the normal import
system never finds it there) and writes ``<that file>.sha256``, the sha256 of the .py it
was built from.  The finder below loads such a build in place of the .py only when

* ``HYPERNAT_NO_EXTENSIONS`` is unset (or ``0``): set, everything runs on the sources
  (the fast path too); ``HYPERNAT_NO_COMPILED_PY=1`` runs these modules from their .py
  but keeps the Cython fast path (to compare, or to debug the slow path);
* the build exists for this interpreter (its EXT_SUFFIX);
* its .sha256 matches the .py as it is now.  A stale build (the .py was edited since) is
  not loaded: the .py is, with one warning naming the module (``make build`` rebuilds).

So the .py is always the truth: an edit takes effect at once, compiled or not.
``compiled_modules()`` names the modules that load (or loaded) compiled.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"

_COMPILED_DIR = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "_compiled")


def _compiled_disabled() -> bool:
    return any(_os.environ.get(v, "") not in ("", "0") for v in ("HYPERNAT_NO_EXTENSIONS", "HYPERNAT_NO_COMPILED_PY"))


class _CompiledFinder:
    """A meta-path finder for the modules built into hypernat/_compiled (see above)."""

    def __init__(self, directory: str):
        import importlib.machinery

        self.directory = directory
        self.suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        self.root = _os.path.dirname(directory)  # the hypernat package directory
        try:
            names = _os.listdir(directory)
        except OSError:
            names = []
        end = self.suffix + ".sha256"
        self.candidates = {n[: -len(end)] for n in names if n.endswith(end)}
        self.verdicts = {}  # module name -> path of its fresh build, or None

    def source_of(self, fullname: str) -> str:
        return _os.path.join(self.root, *fullname.split(".")[1:]) + ".py"

    def build_of(self, fullname: str):
        """The path of fullname's compiled build if it is there and current, else None
        (a stale build is reported once)."""
        if fullname in self.verdicts:
            return self.verdicts[fullname]
        so = _os.path.join(self.directory, fullname + self.suffix)
        path = None
        try:
            with open(so + ".sha256") as f:
                stamp = f.read().split()[0]
            with open(self.source_of(fullname), "rb") as f:
                source = f.read()
        except (OSError, IndexError):
            stamp = source = None
        if stamp is not None and _os.path.exists(so):
            import hashlib

            if hashlib.sha256(source).hexdigest() == stamp:
                path = so
            else:
                import logging

                logging.getLogger("hypernat").warning(
                    "%s: its compiled build (%s) is older than %s: running the .py; "
                    "`make build` rebuilds it",
                    fullname, _os.path.relpath(so, _os.path.dirname(self.root)),
                    _os.path.relpath(self.source_of(fullname), _os.path.dirname(self.root)),
                )
        self.verdicts[fullname] = path
        return path

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.candidates:
            return None
        so = self.build_of(fullname)
        if so is None:
            return None  # the normal import system loads the .py
        import importlib.machinery
        import importlib.util

        loader = importlib.machinery.ExtensionFileLoader(fullname, so)
        return importlib.util.spec_from_file_location(fullname, so, loader=loader)

    def invalidate_caches(self):
        pass


def compiled_modules() -> tuple:
    """The modules that load compiled (built, current, extensions not disabled), sorted."""
    finder = next((f for f in _sys.meta_path if isinstance(f, _CompiledFinder)), None)
    if finder is None:
        return ()
    return tuple(sorted(n for n in finder.candidates if finder.build_of(n)))


if not _compiled_disabled() and _os.path.isdir(_COMPILED_DIR):
    _sys.meta_path.insert(0, _CompiledFinder(_COMPILED_DIR))
