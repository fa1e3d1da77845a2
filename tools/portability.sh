#!/usr/bin/env bash
# Portability guard for the fast path (BlueField runs aarch64):
#  1. build every Cython extension the x86-64 build builds for aarch64 with Debian's cross
#     gcc, against an arm64 Debian root (tools/arm64-root.sh: debootstrap, cached) and with
#     setup.py's own list and flags (tools/cross_aarch64.py); compile the plain-Python
#     slow-path modules setup.py compiles (its COMPILED_PY) for aarch64 too: an x86-only
#     construct fails here;
#  2. build a copy of the tree with -funsigned-char (ARM's plain char is unsigned) and
#     run the fast-path tests on it: a signedness bug shows up on x86 too;
#  3. run the fast-path tests (tests/test_fastpath_*.py, tests/test_frag*.py: both twins,
#     compared byte for byte) on the aarch64 build, inside the arm64 root under qemu-user.
# Anything that cannot run is a failure, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
t_start=$SECONDS
PY=$(cd "$(dirname "${PY:-.venv/bin/python}")" && pwd)/$(basename "${PY:-.venv/bin/python}")
CROSS=${CROSS:-aarch64-linux-gnu-gcc}
tmp=$(mktemp -d)
arm_tree=
cleanup() { rm -rf "$tmp"; [ -z "$arm_tree" ] || rm -rf "$arm_tree"; }
trap cleanup EXIT

if ! command -v "$CROSS" >/dev/null; then
  echo "portability: $CROSS not found (apt-get install gcc-aarch64-linux-gnu)" >&2
  exit 1
fi
$PY setup.py -q build_ext --inplace >/dev/null   # makes sure the generated C is current
# ccache (tools/install-deps.sh installs it) keeps the cross-compiled objects between runs:
# the compiled slow path takes minutes and rarely changes.  Paths under the root (the tree
# copy's name changes every run) are hashed relative to it.
cross_cc=$CROSS
command -v ccache >/dev/null && cross_cc="ccache $CROSS"

# 1. the aarch64 build, into a copy of the tree inside the root (the tests run there)
root=$(bash tools/arm64-root.sh ensure)
arm_tree=$(mktemp -d "$root/tmp/hypernat-portability.XXXXXX")
git ls-files -z | xargs -0 -I{} cp --parents {} "$arm_tree/"
compiled_py=$($PY -c 'import ast
for node in ast.parse(open("setup.py").read()).body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "COMPILED_PY" for t in node.targets):
        print(" ".join(m.replace(".", "/") + ".c" for m in ast.literal_eval(node.value)))')
[ -n "$compiled_py" ] || { echo "portability: setup.py declares no COMPILED_PY" >&2; exit 1; }
if [ "${HYPERNAT_COMPILE_PY:-1}" = 0 ]; then
  echo "portability: HYPERNAT_COMPILE_PY=0: the compiled .py modules are not checked"
  compiled_py=
fi
# shellcheck disable=SC2086  # a list of paths
CROSS=$cross_cc CCACHE_DIR=${CCACHE_DIR:-/var/cache/hypernat/ccache} CCACHE_BASEDIR=$root CCACHE_NOHASHDIR=1 \
  $PY tools/cross_aarch64.py "$root" "$arm_tree" $compiled_py

# The fast-path tests (and the fragment table's, where there is one)
# (and hypernat/nat's model test: the per-connection C state, checked against its reference)
# (and the switch hash in C against its reference: byte order matters to jhash)
# (the fragment table's own tests, not those that drive whole NIC workers: the arm64 root
# has no ZeroMQ)
mapfile -t tests < <(git ls-files 'tests/test_fastpath_*.py' 'tests/test_frag.py' 'tests/test_nat_model.py' 'tests/test_reuse.py' \
  'tests/test_switchhash_compiled.py')
[ ${#tests[@]} -gt 0 ] || { echo "portability: no fast-path tests found" >&2; exit 1; }

# 2. -funsigned-char on x86-64
mkdir "$tmp/tree"
git ls-files -z | xargs -0 -I{} cp --parents {} "$tmp/tree/"
(
  cd "$tmp/tree"
  # every .pyx extension setup.py builds (no list to keep in step); the compiled .py
  # modules are left out (plain Python compiled as it is: char signedness is not theirs)
  HYPERNAT_CFLAGS=-funsigned-char HYPERNAT_COMPILE_PY=0 "$PY" setup.py -q build_ext --inplace >/dev/null
  "$PY" -m pytest -q -p no:cacheprovider -m "not netns" "${tests[@]}" tests/test_clones_twins.py tests/test_pending_table.py
)
echo "portability: every .pyx extension built with -funsigned-char; fast-path, fragment, hypernat/nat, clone-table and agent-table tests pass"

# 3. the fast-path tests on aarch64, under qemu-user.  Every built extension must import
#    there (its libraries resolve), and the fast path must be the aarch64 build.
rel=${arm_tree#"$root"}
# The tests build their expected frames with scapy: the root's Debian scapy (2.5) lacks
# fields the tests use (Dot1Q.dei) and would also regenerate a different golden file, so
# the venv's scapy (pure Python, the version make test ran with) goes in front of it.
scapy_dir=$("$PY" -c 'import os, scapy; print(os.path.dirname(scapy.__file__))')
mkdir -p "$arm_tree/_pylib"
cp -r "$scapy_dir" "$arm_tree/_pylib/"
t_arm=$SECONDS
# shellcheck disable=SC2016  # expanded by the root's shell
bash tools/arm64-root.sh run /bin/sh -c 'cd "$1" && exec python3 -c "
import importlib, sys
names = open(\"build/aarch64/modules\").read().split()
for m in names:
    f = importlib.import_module(m).__file__
    assert f.endswith(\"-aarch64-linux-gnu.so\"), (m, f)
import platform, numpy, hypernat.fastpath as fp
assert fp.IMPL == \"cython\", fp.IMPL
print(\"portability: imported on\", platform.machine(), \"(Python\", platform.python_version(), \"numpy\",
      numpy.__version__ + \"):\", *names)"' sh "$rel"
# Left out: test_under_debug_build (it rebuilds the extension with setup.py and Cython
# inside the root, natively under emulation: many minutes; `make test` runs it on x86-64)
# and tests marked netns (they need the namespace testbed).  Anything else skipped fails.
# shellcheck disable=SC2016
bash tools/arm64-root.sh run /bin/sh -c 'cd "$1" && shift && export PYTHONPATH=_pylib && exec python3 -m pytest -q -p no:cacheprovider -rs \
    -m "not netns" --deselect tests/test_fastpath_robustness.py::test_under_debug_build "$@"' sh "$rel" "${tests[@]}" \
  | tee "$tmp/arm.log"
passed=$(grep -Eo '[0-9]+ passed' "$tmp/arm.log" | tail -1 | cut -d' ' -f1)
[ -n "$passed" ] && [ "$passed" -gt 0 ] || { echo "portability: no fast-path test passed on aarch64" >&2; exit 1; }
if grep -Eq '[0-9]+ skipped' "$tmp/arm.log"; then
  echo "portability: fast-path tests were skipped on aarch64 (see the reasons above): a skip is not a pass" >&2
  exit 1
fi
echo "portability: $passed fast-path tests pass on aarch64 (qemu-user, $((SECONDS - t_arm)) s; whole check $((SECONDS - t_start)) s)"
