#!/usr/bin/env bash
# Create (or update) the project-local virtual environment in .venv.
#
# - an existing torch in .venv is kept (GPU machines bring their own build);
# - otherwise torch is installed first: the CPU build where there is no GPU,
#   so no multi-GB CUDA wheels are pulled in by accident;
# - the installed torch is then pinned in a constraints file, next to the pins
#   pip's resolver does not catch (Prefect's server breaks with newer fastapi
#   and sqlalchemy);
# - DeepSpeed is built without build isolation so its build sees our torch
#   instead of downloading another one.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}
STAMP="$VENV/.mydistill-setup"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

# Skip the whole install when nothing it depends on changed since last time.
want=$(cat pyproject.toml constraints/pins.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)-$EXTRAS
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

"$VPY" -m pip install -q --upgrade pip setuptools wheel

if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing the default torch build"
    "$VPY" -m pip install -q torch
  else
    echo "setup: no GPU, installing the CPU build torch==$TORCH_CPU_VERSION"
    "$VPY" -m pip install -q "torch==$TORCH_CPU_VERSION"
  fi
fi

mkdir -p "$VENV"
torch_version=$("$VPY" -c "import torch; print(torch.__version__)" 2>/dev/null)
{ echo "torch==$torch_version"; cat constraints/pins.txt; } > "$VENV/constraints.txt"

# deepspeed ships as an sdist whose setup.py imports torch: build it against ours.
"$VPY" -m pip install -q -c "$VENV/constraints.txt" ninja packaging psutil py-cpuinfo
DS_BUILD_OPS=0 "$VPY" -m pip install -q --no-build-isolation -c "$VENV/constraints.txt" "deepspeed>=0.16"

"$VPY" -m pip install -q -c "$VENV/constraints.txt" -e ".[$EXTRAS]"
echo "$want" > "$STAMP"
echo "setup: done (torch $torch_version)"
