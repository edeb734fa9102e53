"""Self-describing int8 artifacts: graph (JSON), int8 weights and qparams, quant config, versions, in one file.

The file is a torch.save of plain containers (dicts, strings, numbers, tensors) and is read back with
torch.load(weights_only=True): loading never runs pickled code, and the graph is rebuilt only from the types
listed in qat.artifact.codecs. Writes go to a temporary file renamed into place, so a failed export leaves no
half-written artifact.

>>> import torch, torchvision, tempfile, os
>>> from qat.fx import QuantConfig, calibrate, prepare
>>> from qat.int8 import convert
>>> model = torchvision.models.resnet18(num_classes=10).eval()
>>> x = torch.randn(2, 3, 64, 64)
>>> prepared = prepare(model, QuantConfig.preset("w8a8"), (x,)); calibrate(prepared, [x])
>>> int8 = convert(prepared, "reference")
>>> path = os.path.join(tempfile.mkdtemp(), "resnet18.qat")
>>> export(int8, path, example_inputs=(x,))
>>> torch.equal(load(path, backend="reference")(x), int8(x))
True
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import fx, nn

import qat
from qat.artifact.codecs import FUNCTION_NAMES, FUNCTIONS, METHODS, SAFE_ATTRIBUTES, ExportError, decode_arg, \
    decode_module, encode_arg, encode_module
from qat.fx.api import model_device
from qat.fx.rewrite import set_preserved_attr
from qat.kernels import BACKENDS, default_backend

FORMAT = "qat-int8-artifact"
FORMAT_VERSION = 2  # 2: fused layer + add modules store layer_qp / layer_relu (1: conv_qp / conv_relu)
BACKEND_DEVICES = {"reference": ("cpu", "cuda"), "fbgemm": ("cpu",), "cuda": ("cuda",)}


class ArtifactError(RuntimeError):
    """An artifact cannot be read: missing, truncated, corrupt, hostile or of another format version."""


def _encode_graph(gm: fx.GraphModule) -> tuple[list, dict, dict[str, torch.Tensor]]:
    nodes, modules, tensors = [], {}, {}
    for node in gm.graph.nodes:
        entry = {"name": node.name, "op": node.op, "args": encode_arg(node.args), "kwargs": encode_arg(node.kwargs)}
        if node.op == "call_module":
            entry["target"] = node.target
            if node.target not in modules:
                type_name, config, module_tensors = encode_module(gm.get_submodule(node.target))
                modules[node.target] = {"type": type_name, "config": config, "tensors": sorted(module_tensors)}
                tensors.update({f"{node.target}/{k}": v.detach().cpu() for k, v in module_tensors.items()})
        elif node.op == "call_function":
            if node.target not in FUNCTION_NAMES:
                raise ExportError(f"node '{node.name}' calls {node.target!r}, which the artifact format does not list")
            if node.target is getattr and node.args[1] not in SAFE_ATTRIBUTES:
                raise ExportError(f"node '{node.name}' reads .{node.args[1]}; allowed: {sorted(SAFE_ATTRIBUTES)}")
            entry["target"] = FUNCTION_NAMES[node.target]
        elif node.op == "call_method":
            if node.target not in METHODS:
                raise ExportError(f"node '{node.name}' calls method .{node.target}(), not in {sorted(METHODS)}")
            entry["target"] = node.target
        elif node.op == "get_attr":
            entry["target"] = node.target
            tensors[f"attr/{node.target}"] = getattr_path(gm, node.target).detach().cpu()
        elif node.op == "placeholder":
            entry["target"] = node.target
        nodes.append(entry)
    return nodes, modules, tensors


def getattr_path(root: nn.Module, path: str):
    value = root
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _config_json(gm: fx.GraphModule) -> str:
    config = getattr(gm, "qat_config", None)
    return json.dumps(dataclasses.asdict(config), default=str) if config is not None else "null"


def export(int8: fx.GraphModule, path: str | os.PathLike, example_inputs: tuple | None = None) -> None:
    """Write `int8` (from qat.convert) to `path` atomically; with example_inputs, check the saved file reproduces
    the model's outputs before it replaces anything."""
    if not hasattr(int8, "qat_backend"):
        raise ExportError("export() needs an int8 model from qat.int8.convert(...)")
    nodes, modules, tensors = _encode_graph(int8)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": json.dumps({"qat": qat.__version__, "torch": torch.__version__}),
        "backend": int8.qat_backend,
        "graph": json.dumps({"nodes": nodes, "modules": modules}),
        "quant_config": _config_json(int8),
        "tensors": tensors,
    }
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        if example_inputs is not None:
            _check_round_trip(int8, tmp, example_inputs)
        os.chmod(tmp, _default_file_mode())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _check_round_trip(int8: fx.GraphModule, tmp: str, example_inputs: tuple) -> None:
    """Load the written file where ``int8`` lives (a model on the GPU is checked on the GPU) and compare."""
    loaded = load(tmp, backend=int8.qat_backend, device=model_device(int8))
    with torch.no_grad():
        expected, got = int8(*example_inputs), loaded(*example_inputs)
    if not torch.equal(expected, got):
        raise ExportError("the written artifact does not reproduce the model's outputs; nothing was saved")


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ArtifactError(f"no artifact at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise ArtifactError(
            f"{path} is not a readable qat artifact (truncated, corrupt, or it holds objects that only "
            f"unsafe unpickling could build, which qat refuses): {type(err).__name__}: {str(err)[:300]}"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a qat int8 artifact (format tag missing)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has artifact format version {payload.get('format_version')}, this qat "
            f"({qat.__version__}) reads version {FORMAT_VERSION}; written by {payload.get('versions')}"
        )
    return payload


def load(path: str | os.PathLike, backend: str | None = None, device: str | torch.device = "cpu") -> fx.GraphModule:
    """Rebuild an int8 model from an artifact (no pickled code runs). backend: kernel backend to compute with
    (default: the one it was exported with if it suits `device`, else the device's default)."""
    payload = _read(Path(path))
    graph_spec = json.loads(payload["graph"])
    if backend is None:
        saved = payload["backend"]
        backend = saved if torch.device(device).type in BACKEND_DEVICES.get(saved, ()) else default_backend(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; available: {', '.join(sorted(BACKENDS))}")
    tensors = payload["tensors"]
    root = nn.Module()
    for target, spec in graph_spec["modules"].items():
        module_tensors = {k: tensors[f"{target}/{k}"] for k in spec["tensors"]}
        _install(root, target, decode_module(spec["type"], spec["config"], module_tensors, backend))
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for entry in graph_spec["nodes"]:
        nodes[entry["name"]] = _add_node(graph, root, entry, nodes, tensors)
    gm = fx.GraphModule(root, graph, "Int8Model")
    set_preserved_attr(gm, "qat_backend", backend)
    set_preserved_attr(gm, "qat_artifact_versions", json.loads(payload["versions"]))
    set_preserved_attr(gm, "qat_quant_config", json.loads(payload["quant_config"]))
    return gm.to(device).eval()


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module that will own `path` (empty containers created on the way) and the last name."""
    *parents, name = path.split(".")
    parent = root
    for part in parents:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    return parent, name


def _install(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, name = _parent(root, path)
    parent.add_module(name, module)


def _add_node(graph: fx.Graph, root: nn.Module, entry: dict, nodes: dict, tensors: dict) -> fx.Node:
    op, args, kwargs = entry["op"], decode_arg(entry["args"], nodes), decode_arg(entry["kwargs"], nodes)
    if op == "placeholder":
        node = graph.placeholder(entry["target"])
    elif op == "output":
        node = graph.output(args[0])
    elif op == "call_module":
        node = graph.call_module(entry["target"], args, kwargs)
    elif op == "call_function":
        node = graph.call_function(FUNCTIONS[entry["target"]], args, kwargs)
    elif op == "call_method":
        if entry["target"] not in METHODS:
            raise ArtifactError(f"artifact calls an unlisted method {entry['target']!r}")
        node = graph.call_method(entry["target"], args, kwargs)
    elif op == "get_attr":
        _install_tensor(root, entry["target"], tensors[f"attr/{entry['target']}"])
        node = graph.get_attr(entry["target"])
    else:
        raise ArtifactError(f"artifact holds an unknown node kind {op!r}")
    node.name = entry["name"]
    return node


def _install_tensor(root: nn.Module, path: str, tensor: torch.Tensor) -> None:
    parent, name = _parent(root, path)
    parent.register_buffer(name, tensor)
