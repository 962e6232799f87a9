#!/usr/bin/env bash
# The wheels bench/gpu_bench.py needs on a GPU box whose Python has only torch, numpy, msgpack, uvloop and
# httpx: ../shared/gpu/fetch-wheels.sh's list, plus the few packages that list assumes the box already has
# (uvicorn's click, fastapi's opentelemetry-api, gymnasium's MuJoCo module's imageio, pillow and packaging, the
# checkpoints' safetensors, the metrics' prometheus-client). Versions from requirements/constraints.txt; one each.
# Usage (from the repository root, on a machine that reaches PyPI): bench/gpu_wheels.sh [DEST]  (default .whl)
# On the box: docs/performance.md, "GPU", has the command.
set -euo pipefail
DEST=${1:-.whl}
PYVER=${PYVER:-3.12}  # the box's Python
FETCH=${FETCH_WHEELS:-../shared/gpu/fetch-wheels.sh}
if [ "$PYVER" = 3.12 ] && [ -x "$FETCH" ]; then
  "$FETCH" "$DEST"
else
  echo "not running $FETCH (missing, or PYVER=$PYVER is not its 3.12): extras only" >&2
fi
mkdir -p "$DEST"
pin() {  # NAME -> NAME==VERSION when the constraints file pins it
  local n=$1 line
  line=$(grep -i -E "^${n//-/[-_]}==" requirements/constraints.txt 2>/dev/null | head -1 || true)
  if [ -n "$line" ]; then echo "$line"; else echo "$n"; fi
}
for n in click imageio pillow packaging opentelemetry-api safetensors prometheus-client; do
  spec=$(pin "$n")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$DEST" "$spec" \
    || echo "could not fetch $spec" >&2
done
# metaworld (37 MB, most of the download) is for Meta-World tasks, which the benchmark does not run; leaving it
# out keeps what travels to the box small. KEEP_METAWORLD=1 keeps it.
[ "${KEEP_METAWORLD:-0}" = 1 ] || rm -f "$DEST"/metaworld-*.whl
dupes=$(ls "$DEST" | sed -E 's/-[0-9].*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dupes" ] || { echo "two versions of: $dupes (keep one: pip refuses both)" >&2; exit 1; }
du -sh "$DEST"; ls "$DEST" | wc -l
