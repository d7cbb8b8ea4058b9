"""``python -m sdlive.daemon.model.probe``: one JSON line saying whether CUDA is usable and which real models are on
disk. Clients (``sdlive demo``) ask it from a separate interpreter so they never import torch themselves."""

from __future__ import annotations

import json


def probe() -> dict:
    import torch

    from .sources import list_models

    return {
        "cuda": torch.cuda.is_available(),
        "downloaded": [m.name for m in list_models() if m.downloaded and m.name != "tiny"],
    }


def main() -> None:
    try:
        result = probe()
    except Exception as exc:  # noqa: BLE001 - reported to the caller, who falls back to the tiny model
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
