#!/usr/bin/env bash
# Sets up everything `make demo` and `make test` need, from nothing, idempotently:
# the Debian libraries Open3D loads, a virtual environment, torch, and this package.
#
# Environment knobs:
#   PYTHON       interpreter that creates the venv (default: python3)
#   VENV         venv folder (default: .venv)
#   TORCH_SPEC   pip requirement(s) for torch when none is installed
#                (default: a torch/torchvision pair whose torchvision imports beside it)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

bash scripts/install_system_deps.sh

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    # Reuse the torch this interpreter already has instead of installing a second copy.
    say "torch found in $PYTHON: creating $VENV with access to its site-packages"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if [ -z "${TORCH_SPEC:-}" ]; then
    # PyPI's torchvision does not import beside every torch build; these pairs are known to.
    case "$(uname -m)" in
      aarch64|arm64) TORCH_SPEC="torch==2.9.1 torchvision==0.24.1" ;;
      *)             TORCH_SPEC="torch==2.14.1 torchvision==0.29.1" ;;
    esac
  fi
  say "installing $TORCH_SPEC (a few minutes the first time)"
  # shellcheck disable=SC2086
  "${PIP[@]}" install -q $TORCH_SPEC
elif ! "$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1; then
  # timm needs torchvision; pin torch to the installed version so it is never reinstalled.
  TV=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
  say "torch $TV found without a working torchvision: installing a matching torchvision"
  "${PIP[@]}" install -q torchvision "torch==$TV"
else
  say "using installed torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
fi

say "installing pointclora and its dependencies"
"${PIP[@]}" install -q -e ".[dev,bench]"
"$VENV/bin/python" -c "import torch, torchvision, timm, fvcore, h5py, pointclora" \
  || { echo "[setup] the environment does not import; see the messages above" >&2; exit 1; }
if ! "$VENV/bin/python" -c "import open3d" >/dev/null 2>&1; then
  say "warning: open3d does not import (missing system libraries?); visualisation falls back to matplotlib"
fi
touch "$VENV/.pointclora-installed"
say "ready: $VENV"
