#!/usr/bin/env bash
# Installs the system packages my-claw needs, only when they are missing.
#   build: a C compiler (for SQLite, oniguruma and ring), python3 + pip (model fetch), npm
#   test:  the above plus a C++ compiler (the CUDA kernels' CPU emulation test), Debian's
#          Chromium and ChromeDriver and python3-venv, and the
#          official `openai` Python client (pinned in tests/openai_client/requirements.txt)
#          in a venv under the target directory, where the /v1 tests look for it
set -euo pipefail
mode=${1:-build}

need=()
command -v cc >/dev/null || need+=(build-essential)
command -v python3 >/dev/null || need+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
command -v npm >/dev/null || need+=(npm)
if [ "$mode" = test ]; then
  command -v c++ >/dev/null || need+=(g++)
  command -v chromium >/dev/null || need+=(chromium)
  command -v chromedriver >/dev/null || need+=(chromium-driver)
  python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
fi
if ! command -v cargo >/dev/null; then
  echo "cargo is missing: install Rust (rustup) first" >&2
  exit 1
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ "$mode" = test ]; then
  # The test command checks formatting and lints; rustup brings both components from the
  # Rust distribution when this toolchain lacks them.
  for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
      command -v rustup >/dev/null || { echo "cargo $component is missing and rustup is not installed" >&2; exit 1; }
      rustup component add "$component"
    fi
  done
fi
if [ "$mode" = test ]; then
  # The /v1 tests drive my-claw with the official openai client. A venv keeps it out of the
  # system Python; the tests make the same venv themselves when it is missing.
  venv="${CARGO_TARGET_DIR:-$(dirname "$0")/../target}/tmp/openai-venv"
  requirements="$(dirname "$0")/../tests/openai_client/requirements.txt"
  pinned=$(grep -E '^openai==' "$requirements" | cut -d= -f3)
  if ! "$venv/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$pinned')" 2>/dev/null; then
    echo "installing the openai Python client $pinned into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  fi
fi
