#!/bin/sh
# Create .venv and install ddil's dependencies. Reuses an importable torch (a GPU user's build) through
# --system-site-packages; otherwise installs the CPU wheel torch==2.13.0. Idempotent: make calls it when
# .venv/.installed is missing or older than requirements.txt.
set -eu
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "install: reusing torch $("$PYTHON" -c 'import torch; print(torch.__version__)') from $PYTHON"
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "install: no importable torch; installing the CPU wheel torch==2.13.0"
  .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -r requirements.txt
touch .venv/.installed
