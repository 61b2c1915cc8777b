#!/usr/bin/env bash
# The prepared accelerator check (README "Device check"): one run of at most 8 minutes that
# writes $OUT/device_check.json and $OUT/device_check.md (--out DIR elsewhere).
#   tools/device_check.sh            # on the accelerator machine (nvidia-h200)
#   tools/device_check.sh --smoke    # here, on CPU, tiny shapes, end to end (make test runs it)
# Extra arguments go to tools/device_check.py (--shapes, --sections, --capacities, --budget_s).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The check imports none of grain, ml-collections or gguf (absent from the accelerator image);
# if a later change makes it need them, put their wheels in .whl/ (README) and they go in here.
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target .whl/site .whl/*.whl
  export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# the accelerator image has the package uncompiled and uninstalled: the repository goes on the path
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
if [[ " $* " == *" --smoke "* ]]; then
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  exec timeout 600 "$PY" tools/device_check.py "$@"
fi
# new work stops at --budget_s (400 s); the hard limit keeps the whole run under 8 minutes, and
# the report on disk is rewritten after every section, so a cut-short run still reports
exec timeout 470 "$PY" tools/device_check.py --budget_s 400 "$@"
