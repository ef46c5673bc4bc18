#!/usr/bin/env bash
# mypy --strict over the package laid out as it installs (same as tests/test_api.py).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/cascada"
cp -r "$repo/cascada/." "$tmp/cascada/"
for sub in actors transport stages cudakernels; do cp -r "$repo/$sub" "$tmp/cascada/$sub"; done
find "$tmp" -name __pycache__ -prune -exec rm -rf {} +
cd "$tmp" && "$repo/.venv/bin/python" -m mypy --strict --ignore-missing-imports --cache-dir /tmp/.cascada-mypy-cache -p cascada
