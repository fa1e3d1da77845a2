#!/usr/bin/env bash
# Portability guard for the fast path (BlueField runs aarch64):
#  1. compile every Cython-generated C file for aarch64 with Debian's cross gcc, against
#     the Python and numpy headers: an x86-only construct fails here (the .pyx modules and
#     the plain-Python slow-path modules setup.py compiles, its COMPILED_PY);
#  2. build a copy of the tree with -funsigned-char (ARM's plain char is unsigned) and
#     run the fast-path tests on it: a signedness bug shows up on x86 too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(cd "$(dirname "${PY:-.venv/bin/python}")" && pwd)/$(basename "${PY:-.venv/bin/python}")
CROSS=${CROSS:-aarch64-linux-gnu-gcc}
pyinc=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
npinc=$($PY -c 'import numpy; print(numpy.get_include())')
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if ! command -v "$CROSS" >/dev/null; then
  echo "portability: $CROSS not found (apt-get install gcc-aarch64-linux-gnu)" >&2
  exit 1
fi
$PY setup.py -q build_ext --inplace >/dev/null   # makes sure the generated C is current
cross() {  # cross-compile one generated C file (extra gcc flags after it); its object must be aarch64
  local c=$1 o; shift
  o="$tmp/$(echo "${c%.c}" | tr / .).o"
  # The cross compiler brings its own libc headers; pyconfig.h of this x86-64 Python
  # matches aarch64's LP64 model for everything the extension uses.
  "$CROSS" -std=gnu99 -O2 -fPIC -Werror=implicit-function-declaration -Wno-unused-function \
      -I"$pyinc" -I"$npinc" -DNPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION \
      "$@" -c "$c" -o "$o"
  file "$o" | grep -q 'ARM aarch64' || { echo "portability: $c: not an aarch64 object" >&2; exit 1; }
  echo "portability: $c compiles for aarch64"
}
n=0
for pyx in $(git ls-files 'hypernat/*.pyx' 'hypernat/**/*.pyx'); do
  c=${pyx%.pyx}.c
  if grep -q '^# hypernat: requires=' "$pyx" && [ ! -f "$c" ]; then
    echo "portability: $pyx skipped (its libraries are not installed for the host build)"; continue
  fi
  cross "$c"
  n=$((n+1))
done
[ "$n" -gt 0 ] || { echo "portability: nothing compiled" >&2; exit 1; }
# The compiled .py modules (setup.py's COMPILED_PY; their C is generated beside the .py)
compiled_py=$($PY -c 'import ast
for node in ast.parse(open("setup.py").read()).body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "COMPILED_PY" for t in node.targets):
        print(" ".join(m.replace(".", "/") + ".c" for m in ast.literal_eval(node.value)))')
[ -n "$compiled_py" ] || { echo "portability: setup.py declares no COMPILED_PY" >&2; exit 1; }
if [ "${HYPERNAT_COMPILE_PY:-1}" = 0 ]; then
  echo "portability: HYPERNAT_COMPILE_PY=0: the compiled .py modules are not checked"
else
  # in parallel, two at a time: these are big (seconds to a minute each).
  # -Wno-array-bounds as in setup.py (gcc's false positives on Cython's None comparisons)
  export -f cross; export CROSS pyinc npinc tmp
  printf '%s\n' $compiled_py | xargs -P 2 -I{} bash -c 'set -euo pipefail; cross {} -Wno-array-bounds'
fi

mkdir "$tmp/tree"
git ls-files -z | xargs -0 -I{} cp --parents {} "$tmp/tree/"
(
  cd "$tmp/tree"
  HYPERNAT_CFLAGS=-funsigned-char HYPERNAT_BUILD_ONLY=hypernat._fastpath,hypernat._frag,hypernat._clones,hypernat._serve \
    "$PY" setup.py -q build_ext --inplace >/dev/null
  "$PY" -m pytest -q -p no:cacheprovider tests/test_fastpath_*.py tests/test_frag.py tests/test_clones_twins.py
)
echo "portability: fast-path and clone tests pass with -funsigned-char"
