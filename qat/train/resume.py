"""Checks on the Lightning checkpoint a run resumes from (`ckpt_path`), made before Lightning loads it: the file
is readable, and its state dict fits the run's module (the same keys, shapes and quantizer kinds). A damaged file
or one written by a run with another model, preset or qat version then stops the run with a ConfigError that names
the file and what differs, instead of a zip-reader error, a KeyError deep in load_state_dict or a list of hundreds
of keys.

    >>> import torch, tempfile, os
    >>> net = torch.nn.Linear(2, 3)
    >>> path = os.path.join(tempfile.mkdtemp(), "last.ckpt")
    >>> torch.save({"state_dict": {"weight": torch.zeros(3, 2)}}, path)
    >>> check_fits(read_checkpoint_state(path), net, path)
    Traceback (most recent call last):
    ...
    qat.train.settings.ConfigError: ckpt_path=... does not fit this run's network (...): 1 missing (bias)...
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.train.settings import ConfigError

_NAMED = 3  # keys named per kind of difference


def read_checkpoint_state(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint's state dict, read without unpickling code (weights_only). None where the file needs code
    to unpickle (Lightning, trusting the user's own file, reads it then); ConfigError where it is damaged (torch
    writes zip archives: a truncated or foreign file is none) or holds no state dict."""
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"ckpt_path={str(path)!r} is not a readable checkpoint (not a zip archive, which torch "
                          "writes); the file is damaged or not a torch checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a class outside weights_only's allowed ones
        return None
    except Exception as error:  # a damaged archive member
        raise ConfigError(f"ckpt_path={str(path)!r} is not a readable checkpoint ({type(error).__name__}: "
                          f"{_first_sentence(error)}); the file is damaged") from error
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"ckpt_path={str(path)!r} holds no Lightning state_dict; allowed: a checkpoint written by "
                          "a training run (e.g. <run>/checkpoints/last.ckpt)")
    return state


def check_fits(state: dict[str, Any], module: nn.Module, path: str | Path, run: str = "") -> None:
    """ConfigError unless `state` has `module`'s keys, tensor shapes and extra-state fields (the quantizer kinds);
    `run` names the run's settings in the message."""
    own = module.state_dict()
    differences = {
        "missing": [key for key in own if key not in state],
        "unexpected": [key for key in state if key not in own],
        "of another shape": [
            f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}" for key, value in own.items()
            if torch.is_tensor(value) and torch.is_tensor(state.get(key)) and state[key].shape != value.shape
        ],
        "of another quantizer kind": [
            f"{key} {sorted(state[key])} vs {sorted(value)}" for key, value in own.items()
            if isinstance(value, dict) and isinstance(state.get(key), dict) and state[key].keys() != value.keys()
        ],
    }
    found = [f"{len(keys)} {kind} ({', '.join(keys[:_NAMED])}{', ...' if len(keys) > _NAMED else ''})"
             for kind, keys in differences.items() if keys]
    if found:
        raise ConfigError(f"ckpt_path={str(path)!r} does not fit this run's network ({run or type(module).__name__}): "
                          f"{'; '.join(found)}. Resume with the model and quant settings (and the qat version) that "
                          "wrote it")


def _first_sentence(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0] if text else "no message"
