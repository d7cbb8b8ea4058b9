"""``python -m sdlive.daemon.model.probe``: one JSON line saying whether CUDA is usable, which real models are on
disk (``downloaded``) and which trained models ship in the package (``shipped``: ``mini``). Clients (``sdlive demo``)
ask it from a separate interpreter so they never import torch themselves."""

from __future__ import annotations

import json


def probe() -> dict:
    import torch

    from .configs import get_model_spec
    from .sources import list_models

    infos = list_models()
    shipped = {m.name for m in infos if get_model_spec(m.name).shipped_weights is not None}
    return {
        "cuda": torch.cuda.is_available(),
        "downloaded": [m.name for m in infos if m.downloaded and m.name != "tiny" and m.name not in shipped],
        "shipped": [m.name for m in infos if m.downloaded and m.name in shipped],
    }


def auto_model(device: str | None = None) -> tuple[str, str]:
    """The model ``--model auto`` runs and why: a downloaded real model when a GPU is there (``device`` cuda, or
    none given and CUDA available), else ``mini`` when its shipped weights are there, else ``tiny``."""
    try:
        found = probe()
    except Exception as exc:  # noqa: BLE001 - a broken probe must not stop the daemon: the random model still runs
        return "tiny", f"could not look for models ({type(exc).__name__}: {exc})"
    small, toy = ("mini", "mini (toy styles trained on a CPU, shipped in the package)") if found["shipped"] else (
        "tiny", "tiny (random weights)")  # fmt: skip
    real = found["downloaded"]
    if not real:
        return small, f"no downloaded weights, so {toy}; `sdlive models pull wan2.1-1.3b` for the real model"
    if (device or "").startswith("cuda") or (device is None and found["cuda"]):
        return real[0], "downloaded weights found"
    return small, f"{real[0]} is downloaded but there is no GPU to run it in real time, so {toy}"


def main() -> None:
    try:
        result = probe()
    except Exception as exc:  # noqa: BLE001 - reported to the caller, who falls back to the tiny model
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
