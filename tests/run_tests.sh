#!/usr/bin/env bash
# The test command: unit tests, the smoke run end to end through `emlab run`, and
# nbval over the committed notebooks (which re-executes the default study).
set -uo pipefail
cd "$(dirname "$0")/.."
export TQDM_DISABLE=1 PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
status=0
$PY -m pytest tests -q -x || status=$?
# pytest exits 5 when it collected nothing: that is a failure here, never a pass.
if [ "$status" -eq 0 ]; then
  $PY -m pytest --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg \
     --nbval-cell-timeout=3600 notebooks/ -q || status=$?
fi
exit $status
