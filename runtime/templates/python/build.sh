#!/usr/bin/env bash
# Builds {{name}}.wasm from app.py with componentize-py.
# componentize-py comes from $COMPONENTIZE_PY, the PATH, or .venv (created
# here on first use: python3 -m venv .venv && .venv/bin/pip install
# componentize-py=={{componentize_py}}).
set -euo pipefail
cd "$(dirname "$0")"
tool=${COMPONENTIZE_PY:-$(command -v componentize-py || true)}
if [ -z "$tool" ]; then
    if [ ! -x .venv/bin/componentize-py ]; then
        python3 -m venv .venv
        .venv/bin/pip install --quiet "componentize-py=={{componentize_py}}"
    fi
    tool=.venv/bin/componentize-py
fi
"$tool" -d wit -w handler componentize app -o {{name}}.wasm
echo "built {{name}}.wasm; check it with: weir check {{name}}.wasm"
