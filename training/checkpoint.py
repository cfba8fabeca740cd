"""Resumable training checkpoints without pickle: safetensors for tensors, JSON for the rest.

    checkpoints/
      last/model.safetensors       the model after the last finished epoch
      last/optimizer.safetensors   AdamW moments, one tensor per (parameter index, key)
      last/state.json              epoch, best score, early-stopping counter, history,
                                   the optimizer's param-group hyper-parameters
      best.safetensors             the model with the best validation balanced accuracy
      best_val.safetensors         its validation logits and labels (for calibration)

``torch.save``/``torch.load`` would pickle; these files can be read by anyone without
running code. The optimizer state is flattened as ``state.<param index>.<key>`` tensors (AdamW's
``step`` is a tensor too); non-tensor values go to the JSON beside it.
"""
from __future__ import annotations

import json
from pathlib import Path

STATE_VERSION = 1


def optimizer_to_safetensors(state_dict: dict) -> tuple[dict, dict]:
    """torch optimizer ``state_dict()`` -> (flat tensors, JSON-able rest)."""
    import torch

    tensors, scalars = {}, {}
    for idx, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_safetensors(tensors: dict, meta: dict) -> dict:
    """Inverse of `optimizer_to_safetensors`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: str | Path, model_state: dict, optimizer_state: dict, state: dict) -> Path:
    """Writes ``directory/last/`` atomically enough for a crash between epochs (state.json last)."""
    from safetensors.torch import save_file

    last = Path(directory) / "last"
    last.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(last / "model.safetensors"))
    tensors, meta = optimizer_to_safetensors(optimizer_state)
    save_file(tensors, str(last / "optimizer.safetensors"))
    tmp = last / "state.json.tmp"
    tmp.write_text(json.dumps({"version": STATE_VERSION, **state, "optimizer": meta}, indent=1) + "\n")
    tmp.replace(last / "state.json")
    return last


def load_checkpoint(directory: str | Path) -> tuple[dict, dict, dict]:
    """(model state, optimizer state dict, trainer state) from a `save_checkpoint` folder.

    ``directory`` may be the checkpoints folder or its ``last/`` sub-folder.
    """
    from safetensors.torch import load_file

    d = Path(directory)
    if (d / "last" / "state.json").is_file():
        d = d / "last"
    if not (d / "state.json").is_file():
        raise FileNotFoundError(f"no resumable checkpoint in {directory} (expected last/state.json)")
    state = json.loads((d / "state.json").read_text())
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"checkpoint {d} has state version {state.get('version')}, expected {STATE_VERSION}")
    meta = state.pop("optimizer")
    optimizer = optimizer_from_safetensors(load_file(str(d / "optimizer.safetensors")), meta)
    return load_file(str(d / "model.safetensors")), optimizer, state


def save_best(directory: str | Path, model_state: dict, val_logits, val_labels) -> None:
    import torch
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(d / "best.safetensors"))
    save_file({"logits": torch.as_tensor(val_logits).float().contiguous(),
               "labels": torch.as_tensor(val_labels).long().contiguous()}, str(d / "best_val.safetensors"))


def load_best(directory: str | Path) -> tuple[dict, "object", "object"]:
    """(model state, val logits as numpy, val labels as numpy) of the best epoch so far."""
    from safetensors.torch import load_file

    d = Path(directory)
    val = load_file(str(d / "best_val.safetensors"))
    return load_file(str(d / "best.safetensors")), val["logits"].numpy(), val["labels"].numpy()
