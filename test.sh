#!/usr/bin/env bash
# Fresh-machine setup and the whole test suite. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
tools/setup_venv.sh test
# Browser tests drive Debian's chromium (never `playwright install`); install it when missing.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
    SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null || echo "chromium not installed: browser tests will be skipped"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
# The layers of docs/architecture.md are import-linter contracts (pyproject.toml); a violation fails the run.
.venv/bin/lint-imports --no-cache
set +e
# One worker per core (at most 4), a whole test file at a time; ATELIER_TEST_WORKERS=1 runs them in one process.
WORKERS=${ATELIER_TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}
PARALLEL=()
if [ "$WORKERS" -gt 1 ]; then PARALLEL=(-n "$WORKERS" --dist loadfile); fi
.venv/bin/python -m pytest "${PARALLEL[@]}" --durations=15 "$@"  # the slowest tests, so the suite's time stays visible
status=$?
set -e
# pytest exits 5 when no tests were collected; that is not a failure of the suite.
[ "$status" -eq 5 ] && { echo "no tests collected"; exit 0; }
exit "$status"
