#!/usr/bin/env bash
# Idempotent setup: a virtualenv in .venv with the pinned requirements; with --browser also
# Debian's chromium + chromium-driver for the browser test. Re-running is cheap: pip runs only
# when requirements.txt changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

want_browser=0
[ "${1:-}" = "--browser" ] && want_browser=1

python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3; do
    command -v "$candidate" >/dev/null 2>&1 && { python_bin="$candidate"; break; }
  done
fi
[ -n "$python_bin" ] || { echo "setup: Python 3.11 is needed (python3.11 or python3 on PATH)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $python_bin"
  "$python_bin" -m venv .venv
fi

stamp=.venv/.requirements.sha256
wanted=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "setup: installing requirements (first time: several minutes; llama-cpp-python compiles once)"
  .venv/bin/python -m pip install --upgrade pip >/dev/null
  .venv/bin/python -m pip install -r requirements.txt
  echo "$wanted" > "$stamp"
fi

if [ "$want_browser" = 1 ] && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; }; then
  echo "setup: installing Debian chromium + chromium-driver for the browser test"
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium chromium-driver >/dev/null
fi
