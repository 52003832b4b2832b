# Shared set-up steps for deploy/run.sh and deploy/test.sh (sourced, not run).
# Everything here is idempotent: a second run only checks.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RELAY_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else echo "need root to run: $*" >&2; return 1; fi
}

APT_UPDATED=""
apt_install() {
  # Debian's package lists start empty on a fresh machine: update once before installing.
  if [ -z "$APT_UPDATED" ]; then
    say "apt-get update"
    as_root apt-get update -qq
    APT_UPDATED=1
  fi
  say "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

ensure_command() {  # ensure_command BINARY DEBIAN_PACKAGE
  command -v "$1" >/dev/null 2>&1 || apt_install "$2"
}

base_python() {  # the interpreter a new virtualenv is made from
  # RELAY_PYTHON if set; else the distribution's own python3 when it is 3.11 or newer: Debian
  # builds it with profile-guided optimisation and LTO, linked statically, and the relay's
  # processes use 8-18% less CPU on it (the first chunk 0.2-0.5 ms sooner side by side) than on a
  # CPython built without them, as pyenv builds by default (tests/bench/RESULTS.md, "The
  # interpreter"); else python3 from PATH.
  if [ -n "${RELAY_PYTHON:-}" ]; then
    echo "$RELAY_PYTHON"
  elif /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo /usr/bin/python3
  else
    echo python3
  fi
}

ensure_venv() {  # ensure_venv [EXTRA]: a virtualenv with the project installed (editable)
  local extra="${1:-}" spec="$ROOT" stamp base
  [ -n "$extra" ] && spec="$ROOT[$extra]"
  if [ ! -x "$PY" ]; then
    base="$(base_python)"
    say "creating $VENV (from $base, Python $("$base" -c 'import platform; print(platform.python_version())'))"
    if ! "$base" -m venv "$VENV" 2>/dev/null; then
      # Debian ships venv support separately from python3 itself.
      rm -rf "$VENV"
      apt_install python3-venv
      "$base" -m venv "$VENV"
    fi
  fi
  stamp="$VENV/.installed-$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-${extra:-base}"
  if [ ! -f "$stamp" ]; then
    say "installing chat-relay${extra:+ [$extra]} into $VENV"
    "$PY" -m pip install -q --upgrade pip >/dev/null
    "$PY" -m pip install -q -e "$spec"
    touch "$stamp"
  fi
}
