#!/bin/sh
# One-step setup: a virtual environment in .venv with attn-harness and its test tools.
#
# The environment sees the system's packages, so a ROCm or CUDA machine's own torch build is
# used and never replaced (it is pinned while installing). Only when no torch is importable at
# all is torch==2.13.0 installed (the CPU build on machines that carry it locally).
# Idempotent: a second run only checks. PYTHON selects the interpreter (default python3).
set -eu
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "setup.sh: no torch found; installing torch==2.13.0" >&2
    "$VPY" -m pip install --disable-pip-version-check -q "torch==2.13.0"
fi
TORCH_VERSION="$("$VPY" -c "import torch; print(torch.__version__)")"
PIN="$(mktemp)"
trap 'rm -f "$PIN"' EXIT
echo "torch==$TORCH_VERSION" > "$PIN"

if ! "$VPY" -c "import harness, pytest_timeout, xdist, jsonschema, tabulate, hypothesis, matplotlib, yaml, tomli_w, markdown_it, tqdm, numpy" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.attn-harness-installed ]; then
    "$VPY" -m pip install --disable-pip-version-check -q -c "$PIN" -e ".[test,plot]"
    touch .venv/.attn-harness-installed
fi
echo "setup.sh: ready (torch $TORCH_VERSION; run .venv/bin/attn-harness or .venv/bin/python -m pytest)" >&2
