#!/usr/bin/env bash
# One command from a fresh checkout: install sheepdog (and GEMMA where possible),
# then run the main job, a GEMMA LOCO scan of the bundled BXD data, on the embedded
# default Redis. Results land in results/bxd-loco/.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v gemma >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "quickstart: installing GEMMA from Debian (apt-get install gemma)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gemma >/dev/null
  else
    echo "quickstart: GEMMA is not installed and I cannot install it here (needs root and"
    echo "  apt-get). Install it with 'sudo apt-get install gemma' or"
    echo "  'guix install gemma' (see guix/manifest.scm), then run this again."
  fi
fi

python3 -m pip install -q -e .
if ! command -v gemma >/dev/null; then
  echo "quickstart: sheepdog is installed, but without GEMMA the LOCO example cannot run."
  exit 1
fi
exec sheepdog run gemma-loco --example --out results/bxd-loco
