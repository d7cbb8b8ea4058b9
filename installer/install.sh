#!/usr/bin/env sh
# Install the sdlive OBS script (Linux/macOS). Close OBS first. Options: see `python3 installer/install_obs.py -h`.
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for cand in python3 python; do
    if command -v "$cand" >/dev/null 2>&1; then py="$cand"; break; fi
  done
fi
if [ -z "$py" ]; then
  echo "install.sh: no python3 found; install Python 3.10+ (or set PYTHON=/path/to/python)" >&2
  exit 2
fi
exec "$py" "$here/install_obs.py" "$@"
