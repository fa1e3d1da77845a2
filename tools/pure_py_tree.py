"""Copy this tree with its compiled .py modules left out, to run them from source.

    python tools/pure_py_tree.py DEST

setup.py compiles the slow-path modules it lists in COMPILED_PY into extension modules
beside their sources (``hypernat/rules.py`` -> ``hypernat/rules<EXT_SUFFIX>``), which
Python loads in preference to the .py.  DEST gets hypernat/, tests/, conf/, tools/, setup.py and pyproject.toml
with every other build (the fast path's .pyx extensions, generated .pxi) but none of
those: in DEST, ``import hypernat.rules`` runs ``rules.py``.  ``make test`` reruns the
agent, rules and messages tests there (DEST replaced if it exists).
"""
import importlib.machinery
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def ignore(directory, names):
    out = {n for n in names if n in ("__pycache__", ".pytest_cache", ".hypothesis", "_compiled")
           or n.endswith((".c", ".html", ".o", ".tmp"))}
    for n in names:  # a build of a .py (and its stamp): left out, the .py stays
        for end in (SUFFIX, SUFFIX + ".sha256"):
            if n.endswith(end) and n[: -len(end)] + ".py" in names:
                out.add(n)
    return out


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    dest = os.path.abspath(argv[1])
    if os.path.commonpath([dest, ROOT]) == dest:
        print(f"pure_py_tree: {dest} contains the tree itself", file=sys.stderr)
        return 2
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    for d in ("hypernat", "tests", "conf", "tools"):
        shutil.copytree(os.path.join(ROOT, d), os.path.join(dest, d), ignore=ignore)
    for f in ("setup.py", "pyproject.toml"):
        shutil.copy2(os.path.join(ROOT, f), dest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
