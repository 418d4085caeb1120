#!/usr/bin/env bash
# One command from a fresh checkout: make the project's virtualenv (.venv) with the
# system's python3, install sheepdog and its test tools into it (and GEMMA where this
# script may), then run the main job, a GEMMA LOCO scan of the bundled BXD data, on
# the embedded default Redis. Results land in results/bxd-loco/.
#
# Debian's and Ubuntu's python3 refuse `pip install` outside a virtualenv (PEP 668),
# so nothing here installs into the system's Python. PYTHON=/path/to/python3 picks
# another interpreter (3.11 or newer).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
say() { echo "quickstart: $*"; }

# apt-get only as root on a Debian-like system; 1 (and no change) anywhere else.
apt_updated=
apt_install() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
  say "installing $* (apt-get install)"
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! command -v "$PYTHON" >/dev/null; then
  apt_install python3 || { say "no $PYTHON here: install Python 3.11 or newer"; exit 1; }
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  say "$("$PYTHON" -V 2>&1) is too old: sheepdog needs Python 3.11 or newer"
  say "  (run again with PYTHON=/path/to/python3.11 or newer)"
  exit 1
fi

# The virtualenv. Debian and Ubuntu ship venv's pip bootstrap (ensurepip) apart, in
# python3-venv; without it `python3 -m venv` leaves a half-made folder behind.
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    if apt_install python3-venv; then
      "$PYTHON" -m venv "$VENV"
    else
      say "$PYTHON cannot make a virtualenv: its venv module is missing. Install it with"
      say "  'sudo apt-get install python3-venv' (Debian, Ubuntu), then run this again."
      exit 1
    fi
  fi
  say "made the virtualenv $VENV with $("$VENV/bin/python" -V)"
fi

if ! command -v gemma >/dev/null; then
  apt_install gemma || {
    say "GEMMA is not installed and I cannot install it here (that needs root and"
    say "  apt-get). Install it with 'sudo apt-get install gemma' or 'guix install gemma'"
    say "  (see guix/manifest.scm), then run this again."
  }
fi

say "installing sheepdog with its test tools into $VENV (pip install -e '.[test]')"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'

if ! command -v gemma >/dev/null; then
  say "sheepdog is installed in $VENV, but without GEMMA the LOCO example cannot run."
  exit 1
fi

"$VENV/bin/sheepdog" run gemma-loco --example --out results/bxd-loco

cat <<EOF

quickstart: done. The merged LOCO scan is in results/bxd-loco/
  (assoc.txt, result.json, manhattan.png and manhattan.svg).
  sheepdog is installed in $VENV: run it as $VENV/bin/sheepdog, or type
  'source $VENV/bin/activate' once and then just 'sheepdog' (e.g. sheepdog list).
  The embedded Redis it started keeps running for later commands, workers and the
  web service ($VENV/bin/sheepdog redis status); stop it with
  '$VENV/bin/sheepdog redis stop'. Run the tests with: $VENV/bin/python -m pytest -q -n 2 tests
EOF
