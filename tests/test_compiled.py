"""The compiled slow path (setup.py ``COMPILED_PY``, the finder in hypernat/__init__.py).

* a built tree loads every listed module from hypernat/_compiled, under its real name;
* ``HYPERNAT_NO_EXTENSIONS=1`` and ``HYPERNAT_NO_COMPILED_PY=1`` load the .py sources;
* a build older than its .py (the sha256 stamp differs) is never loaded: the .py is, with
  one warning naming the module and ``make build``;
* compiled and source modules define the same names.

As with the fast path, a missing build is a failure, not a skip (CI must not go green on
the sources alone), unless the tree was built with ``HYPERNAT_COMPILE_PY=0``.  Each check
runs in a fresh interpreter (a subprocess), as the finder acts at import.
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


def declared():
    """COMPILED_PY as setup.py declares it (read, not run: setup.py builds when run)."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "COMPILED_PY" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py declares no COMPILED_PY")


COMPILED_PY = declared()


def run(code, root=ROOT, **env):
    """Run code in a fresh interpreter importing hypernat from root; return (json, stderr)."""
    e = {k: v for k, v in os.environ.items()
         if k not in ("HYPERNAT_NO_EXTENSIONS", "HYPERNAT_NO_COMPILED_PY", "PYTHONPATH")}
    e.update(env, PYTHONPATH=root)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=root, env=e,
                       capture_output=True, text=True, timeout=120)
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
""")
PRINT = "print(json.dumps(out))\n"


def needs_build():
    if os.environ.get("HYPERNAT_COMPILE_PY", "1") in ("", "0"):
        pytest.skip("built with HYPERNAT_COMPILE_PY=0: the slow path is not compiled")
    missing = [n for n in COMPILED_PY
               if not os.path.exists(os.path.join(ROOT, "hypernat", "_compiled", n + SUFFIX + ".sha256"))]
    assert not missing, f"not built (run `make build`): {', '.join(missing)}"


def test_declared_modules_exist_as_sources():
    for name in COMPILED_PY:
        assert name.startswith("hypernat.")
        assert os.path.isfile(os.path.join(ROOT, *name.split(".")) + ".py"), name


def test_built_tree_loads_every_listed_module_compiled():
    needs_build()
    out, err = run(WHERE % (COMPILED_PY,) + PRINT)
    for name in COMPILED_PY:
        got = out[name]
        assert got["loader"] == "ExtensionFileLoader", (name, got)
        assert got["file"] == os.path.join(ROOT, "hypernat", "_compiled", name + SUFFIX)
        assert got["name"] == name
    assert sorted(out["compiled_modules"]) == sorted(COMPILED_PY)
    assert "make build" not in err


@pytest.mark.parametrize("switch", ["HYPERNAT_NO_EXTENSIONS", "HYPERNAT_NO_COMPILED_PY"])
def test_switch_loads_the_sources(switch):
    out, err = run(WHERE % (COMPILED_PY,) + PRINT, **{switch: "1"})
    for name in COMPILED_PY:
        assert out[name]["loader"] == "SourceFileLoader", (name, out[name])
        assert out[name]["file"] == os.path.join(ROOT, *name.split(".")) + ".py"
    assert out["compiled_modules"] == []
    assert "make build" not in err


def test_switch_set_to_0_means_unset():
    needs_build()
    out, _ = run(WHERE % (COMPILED_PY[:1],) + PRINT, HYPERNAT_NO_EXTENSIONS="0", HYPERNAT_NO_COMPILED_PY="0")
    assert out[COMPILED_PY[0]]["loader"] == "ExtensionFileLoader"


def test_compiled_and_source_modules_define_the_same_names():
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
    source, _ = run(code, HYPERNAT_NO_COMPILED_PY="1")
    for name in COMPILED_PY:
        assert compiled[name] == source[name], name
        assert any(v == name for v in compiled[name].values()), f"{name} defines no class?"


def copy_tree(tmp_path):
    """hypernat/ with its builds, in a tree of its own."""
    dst = tmp_path / "tree"
    shutil.copytree(os.path.join(ROOT, "hypernat"), dst / "hypernat",
                    ignore=shutil.ignore_patterns("__pycache__", "*.c", "*.html"))
    return dst


def test_stale_build_loads_the_source_and_warns_once(tmp_path):
    needs_build()
    if "hypernat.partition" not in COMPILED_PY:
        pytest.skip("hypernat.partition is not compiled")
    tree = copy_tree(tmp_path)
    with open(tree / "hypernat" / "partition.py", "a") as f:
        f.write("\nEDITED_AFTER_THE_BUILD = True\n")
    others = [n for n in COMPILED_PY if n != "hypernat.partition"]
    code = WHERE % (COMPILED_PY,) + textwrap.dedent("""
        import hypernat.partition
        hypernat.compiled_modules(); hypernat.compiled_modules()
        out["edited"] = hypernat.partition.EDITED_AFTER_THE_BUILD
    """) + PRINT
    out, err = run(code, root=str(tree))
    assert out["edited"] is True
    p = out["hypernat.partition"]
    assert p["loader"] == "SourceFileLoader" and p["file"] == str(tree / "hypernat" / "partition.py")
    for name in others:  # the others are still current
        assert out[name]["loader"] == "ExtensionFileLoader", name
    assert sorted(out["compiled_modules"]) == sorted(others)
    warnings = [line for line in err.splitlines() if "make build" in line]
    assert len(warnings) == 1, err
    assert "hypernat.partition" in warnings[0] and "partition.py" in warnings[0]


def test_stamp_without_build_and_build_without_stamp_load_the_source(tmp_path):
    """Only a build with a matching stamp is loaded; nothing else is even opened."""
    tree = tmp_path / "tree"
    shutil.copytree(os.path.join(ROOT, "hypernat"), tree / "hypernat",
                    ignore=shutil.ignore_patterns("__pycache__", "*.c", "*.html", "_compiled"))
    comp = tree / "hypernat" / "_compiled"
    comp.mkdir()
    import hashlib

    digest = hashlib.sha256((tree / "hypernat" / "partition.py").read_bytes()).hexdigest()
    # a current stamp whose .so is missing
    (comp / f"hypernat.partition{SUFFIX}.sha256").write_text(f"{digest}  hypernat/partition.py\n")
    # a "build" with no stamp (garbage: loading it would fail)
    (comp / f"hypernat.messages{SUFFIX}").write_bytes(b"not an ELF file")
    # a garbage "build" with a stale stamp: never dlopened
    (comp / f"hypernat.agent{SUFFIX}").write_bytes(b"not an ELF file")
    (comp / f"hypernat.agent{SUFFIX}.sha256").write_text("0" * 64 + "  hypernat/agent.py\n")
    out, err = run(WHERE % (["hypernat.partition", "hypernat.messages", "hypernat.agent"],) + PRINT, root=str(tree))
    for name in ("hypernat.partition", "hypernat.messages", "hypernat.agent"):
        assert out[name]["loader"] == "SourceFileLoader", (name, out[name])
    assert out["compiled_modules"] == []
    warnings = [line for line in err.splitlines() if "make build" in line]
    assert len(warnings) == 1 and "hypernat.agent" in warnings[0], err


def test_compiled_files_are_not_importable_by_the_normal_import_system():
    """A build's file name carries the dotted module name, which no import statement can
    reach: with the finder off, nothing in hypernat/_compiled is importable."""
    needs_build()
    code = """
        import importlib.machinery, json, os, pkgutil, sys
        import hypernat
        d = os.path.join(os.path.dirname(hypernat.__file__), "_compiled")
        found = [m.name for m in pkgutil.iter_modules([d])]
        spec = importlib.machinery.PathFinder.find_spec("agent", [d])
        print(json.dumps({"found": found, "spec": spec is not None}))
    """
    out, _ = run(code, HYPERNAT_NO_EXTENSIONS="1")
    assert out == {"found": [], "spec": False}
