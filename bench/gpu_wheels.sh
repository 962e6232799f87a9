#!/usr/bin/env bash
# The wheels bench/gpu_bench.py needs on a GPU box that reaches no package registry and whose Python has only
# torch, numpy, msgpack, uvloop and httpx: the service's, the simulator client's and MuJoCo's packages, for
# CPython 3.12 on x86_64 Linux. Versions from requirements/constraints.txt (one of each: pip refuses two).
#
#   bench/gpu_wheels.sh [DEST]          (from the repository root, on a machine that reaches PyPI; default .whl)
#   PYVER=3.11 bench/gpu_wheels.sh DIR  (the same set for another Python, e.g. to try it on this machine)
#
# On the box: docs/performance.md, "GPU", has the command (pip install --no-index --target /tmp/site).
set -euo pipefail
DEST=${1:-.whl}
PYVER=${PYVER:-3.12}
mkdir -p "$DEST"
# The service (fastapi needs opentelemetry-api, uvicorn click), the stream client (websockets), the
# environments (gymnasium; its MuJoCo module imports imageio, pillow and packaging; mujoco needs absl-py,
# etils, glfw, pyopengl), checkpoints (safetensors) and metrics (prometheus-client). metaworld (37 MB) only
# with KEEP_METAWORLD=1: the benchmark runs no Meta-World task.
NAMES="fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv annotated-types annotated-doc
typing-inspection typing-extensions opentelemetry-api uvicorn click httptools h11 websockets anyio sniffio idna
gymnasium farama-notifications cloudpickle imageio pillow packaging mujoco glfw pyopengl absl-py etils
safetensors prometheus-client"
[ "${KEEP_METAWORLD:-0}" != 1 ] || NAMES="$NAMES metaworld"
pin() {  # NAME -> NAME==VERSION when the constraints file pins it
  local n=$1 line
  line=$(grep -i -E "^${n//-/[-_]}==" requirements/constraints.txt 2>/dev/null | head -1 || true)
  if [ -n "$line" ]; then echo "$line"; else echo "$n"; fi
}
failed=0
for n in $NAMES; do
  spec=$(pin "$n")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$DEST" "$spec" \
    || { echo "could not fetch $spec" >&2; failed=1; }
done
dupes=$(ls "$DEST" | sed -E 's/-[0-9].*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dupes" ] || { echo "two versions of: $dupes (keep one: pip refuses both)" >&2; exit 1; }
du -sh "$DEST"; ls "$DEST" | wc -l
exit "$failed"
