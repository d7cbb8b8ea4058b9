"""``python -m sdlive.daemon.server``: the daemon without the `sdlive` CLI (the same flags as `sdlive serve`)."""

import sys

from .serve import main

if __name__ == "__main__":
    sys.exit(main())
