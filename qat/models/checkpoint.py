"""Read state_dict files safely (weights_only) and load them strictly, with errors that name the file.

    >>> import torch, tempfile, os
    >>> model = torch.nn.Linear(2, 3)
    >>> path = os.path.join(tempfile.mkdtemp(), "linear.pt")
    >>> torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    >>> load_pretrained(torch.nn.Linear(2, 3), path).weight.equal(model.weight)
    True
"""
from pathlib import Path

import torch
from torch import nn


def read_state_dict(checkpoint_path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict with weights_only=True, unwrap {'state_dict': ...} and strip `module.` prefixes."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged files raise pickle, zip, EOF or unpickling errors
        raise ValueError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError(f"checkpoint {path} holds no state_dict (expected a dict of tensors or {{'state_dict': ...}})")
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def load_pretrained(model: nn.Module, checkpoint_path: str | Path) -> nn.Module:
    """Load `checkpoint_path` into `model` strictly; a mismatch raises ValueError naming the file."""
    state_dict = read_state_dict(checkpoint_path)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {checkpoint_path} does not fit {type(model).__name__}: {err}") from err
    return model
