#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv/ from requirements.lock.
# Idempotent: does nothing when .venv already matches the lock file. Needs python3.11 and PyPI
# (torch 2.13.0+cpu comes from the local wheel directory in PIP_FIND_LINKS when present).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
want="$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -x .venv/bin/python ] && [ -f .venv/.dspark-lock ] && [ "$(cat .venv/.dspark-lock)" = "$want" ]; then
  exit 0
fi
echo "[setup] creating .venv from requirements.lock (first run takes a few minutes)" >&2
"$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip >&2
.venv/bin/python -m pip install --quiet -r requirements.lock >&2
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e . >&2
echo "$want" > .venv/.dspark-lock
echo "[setup] done" >&2
