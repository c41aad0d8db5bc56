#!/usr/bin/env bash
# ./dev.sh demo [mc-vllm demo options]  - MegaContext generation on the bundled tiny model
# ./dev.sh test [pytest options]        - the whole test suite
# Both set up .venv first (idempotent).
set -euo pipefail
cd "$(dirname "$0")"
cmd=${1:-}
shift || true
case "$cmd" in
  demo) bash scripts/setup.sh && exec .venv/bin/mc-vllm demo "$@" ;;
  test) bash scripts/setup.sh && exec .venv/bin/python -m pytest "$@" ;;
  setup) exec bash scripts/setup.sh ;;
  *) echo "usage: ./dev.sh demo|test|setup [args]" >&2; exit 2 ;;
esac
