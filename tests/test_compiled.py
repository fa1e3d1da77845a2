"""The compiled slow path (setup.py ``COMPILED_PY``: plain .py modules built by Cython).

* a built tree loads every listed module as the extension module beside its .py, by
  Python's own import system, under its real name;
* a copy of the tree without those builds (tools/pure_py_tree.py, what ``make test``'s
  pure-.py run uses) loads the .py sources, and a run with ``HYPERNAT_COMPILE_PY=0``
  (that run, or a tree built so) really has the sources loaded;
* a build older than its .py (the sha256 stamp differs) is refused at ``import
  hypernat``: an ImportError naming the module and ``make build``, never the old code;
* compiled and source modules define the same names.

As with the fast path, a missing build is a failure, not a skip (CI must not go green on
the sources alone), unless the run says ``HYPERNAT_COMPILE_PY=0``.  Each check runs in a
fresh interpreter (a subprocess): what loads is decided at import.
"""
import ast
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
PURE = os.environ.get("HYPERNAT_COMPILE_PY", "1") in ("", "0")


def declared():
    """COMPILED_PY as setup.py declares it (read, not run: setup.py builds when run)."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "COMPILED_PY" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py declares no COMPILED_PY")


COMPILED_PY = declared()


def build_of(root, name):
    return os.path.join(root, *name.split(".")) + SUFFIX


def source_of(root, name):
    return os.path.join(root, *name.split(".")) + ".py"


def run(code, root=ROOT, ok=True, **env):
    """Run code in a fresh interpreter importing hypernat from root; (json, stderr)."""
    e = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    e.update(env, PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=str(root), env=e,
                       capture_output=True, text=True, timeout=120)
    if not ok:
        assert r.returncode != 0, r.stdout
        return None, r.stderr
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


WHERE = textwrap.dedent("""
    import importlib, json, sys
    import hypernat
    out = {}
    for name in %r:
        m = importlib.import_module(name)
        out[name] = {"file": m.__file__, "name": m.__name__, "loader": type(m.__spec__.loader).__name__}
    out["compiled_modules"] = list(hypernat.compiled_modules())
    print(json.dumps(out))
""")


def needs_build():
    if PURE:
        pytest.skip("HYPERNAT_COMPILE_PY=0: the slow path runs from source here")
    missing = [n for n in COMPILED_PY if not os.path.exists(build_of(ROOT, n) + ".sha256")]
    assert not missing, f"not built (run `make build`): {', '.join(missing)}"


def pure_copy(tmp_path):
    dst = tmp_path / "pure"
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "pure_py_tree.py"), str(dst)], check=True,
                   timeout=120)
    return dst


def test_declared_modules_exist_as_sources():
    for name in COMPILED_PY:
        assert name.startswith("hypernat.")
        assert os.path.isfile(source_of(ROOT, name)), name


def test_built_tree_loads_every_listed_module_compiled():
    needs_build()
    out, _ = run(WHERE % (COMPILED_PY,))
    for name in COMPILED_PY:
        got = out[name]
        assert got["loader"] == "ExtensionFileLoader", (name, got)
        assert got["file"] == build_of(ROOT, name)
        assert got["name"] == name
    assert sorted(out["compiled_modules"]) == sorted(COMPILED_PY)


def test_this_run_loads_the_sources_when_told_so():
    """The pure-.py run of `make test` (HYPERNAT_COMPILE_PY=0) must really run the .py."""
    if not PURE:
        pytest.skip("a compiled run (test_built_tree_loads_every_listed_module_compiled checks it)")
    out, _ = run(WHERE % (COMPILED_PY,))
    for name in COMPILED_PY:
        assert out[name]["loader"] == "SourceFileLoader", (name, out[name])
        assert out[name]["file"] == source_of(ROOT, name)
    assert out["compiled_modules"] == []


def test_pure_copy_loads_the_sources(tmp_path):
    tree = pure_copy(tmp_path)
    for name in COMPILED_PY:
        assert not os.path.exists(build_of(tree, name)) and os.path.isfile(source_of(tree, name))
    out, _ = run(WHERE % (COMPILED_PY,), root=tree)
    for name in COMPILED_PY:
        assert out[name]["loader"] == "SourceFileLoader", (name, out[name])
        assert out[name]["file"] == source_of(tree, name)
    assert out["compiled_modules"] == []
    # the .pyx extensions came along: the fast path is compiled there as here
    fp, _ = run("import json, hypernat._wire as w; print(json.dumps(w.__file__))", root=tree)
    assert fp.endswith(SUFFIX)


def test_compiled_and_source_modules_define_the_same_names(tmp_path):
    """Same module-level names; the classes defined there say so (`__module__`, pickling)."""
    needs_build()
    code = """
        import __future__, importlib, json, pickle, sys
        out = {}
        for name in %r:
            m = importlib.import_module(name)
            # (`from __future__ import annotations` leaves a name in a .py's namespace only)
            out[name] = {k: v.__module__ if isinstance(v, type) else callable(v)
                         for k, v in vars(m).items()
                         if not k.startswith("__") and not isinstance(v, __future__._Feature)}
            for k, v in vars(m).items():
                if isinstance(v, type) and v.__module__ == name:
                    assert pickle.loads(pickle.dumps(v)) is v, (name, k)
        print(json.dumps(out))
    """ % (COMPILED_PY,)
    compiled, _ = run(code)
    source, _ = run(code, root=pure_copy(tmp_path))
    for name in COMPILED_PY:
        assert compiled[name] == source[name], name
        assert any(v == name for v in compiled[name].values()), f"{name} defines no class?"


def test_stale_build_is_refused_by_name(tmp_path):
    """A .py edited after its build: `import hypernat` fails, naming the module and the
    remedy; it never runs the old build (nor silently the .py beside a build)."""
    needs_build()
    if "hypernat.partition" not in COMPILED_PY:
        pytest.skip("hypernat.partition is not compiled")
    tree = tmp_path / "tree"
    shutil.copytree(os.path.join(ROOT, "hypernat"), tree / "hypernat",
                    ignore=shutil.ignore_patterns("__pycache__", "*.c", "*.html"))
    with open(tree / "hypernat" / "partition.py", "a") as f:
        f.write("\nEDITED_AFTER_THE_BUILD = True\n")
    _, err = run("import hypernat.partition", root=tree, ok=False)
    assert "ImportError" in err and "hypernat.partition" in err and "make build" in err, err
    assert not any(n in err for n in COMPILED_PY if n != "hypernat.partition"), err
    # a stamp without its build is nothing to load, and nothing to refuse
    os.remove(build_of(tree, "hypernat.partition"))
    out, _ = run(WHERE % (["hypernat.partition"],), root=tree)
    assert out["hypernat.partition"]["loader"] == "SourceFileLoader"
