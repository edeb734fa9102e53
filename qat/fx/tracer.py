"""torch.fx tracing with a leaf-module registry, readable errors and a leaf fallback for untraceable code.

Leaves are modules the tracer does not enter: torch.nn modules without children (Conv2d, ReLU, ...), the
types in LEAF_TYPES (modules whose forward depends on self.training, which tracing would bake in), and
paths given by the user or found untraceable.
"""
from __future__ import annotations

import fnmatch
import traceback
from dataclasses import dataclass

import torchvision
from torch import fx, nn

# module types kept as leaves: their forward reads self.training (tracing would freeze the mode) or
# calls a wrapped function with it
LEAF_TYPES: tuple[type[nn.Module], ...] = (
    torchvision.ops.StochasticDepth,
    torchvision.models.swin_transformer.ShiftedWindowAttention,
    torchvision.models.swin_transformer.ShiftedWindowAttentionV2,
    nn.MultiheadAttention,
)


class UntraceableModelError(RuntimeError):
    """Raised when torch.fx cannot trace a model; names the module path and the source line."""

    def __init__(self, module_path: str, source_line: str, cause: Exception):
        self.module_path = module_path
        self.source_line = source_line
        where = f"module '{module_path}'" if module_path else "the model's top-level forward"
        super().__init__(
            f"torch.fx cannot trace {where}: {type(cause).__name__}: {cause}\n"
            f"  at {source_line}\n"
            f"How to fix: make the control flow independent of tensor values, or keep this module out of the "
            f"graph with QuantConfig(leaf_modules=('{module_path or '<path>'}',)), or pass "
            f"QuantConfig(on_untraceable='leaf') to make it a leaf automatically (it is then quantized by "
            f"module swap)."
        )


@dataclass(frozen=True)
class TraceResult:
    graph_module: fx.GraphModule
    leaves: tuple[str, ...]  # user/fallback leaf paths


class QatTracer(fx.Tracer):
    """fx.Tracer whose leaves are LEAF_TYPES, childless torch.nn modules and `leaf_paths` patterns."""

    def __init__(self, leaf_paths: tuple[str, ...] = ()):
        super().__init__()
        self.leaf_paths = leaf_paths
        self.failed_path: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if any(fnmatch.fnmatchcase(qualname, p) for p in self.leaf_paths):
            return True
        if isinstance(m, LEAF_TYPES):
            return True
        is_torch_nn = m.__module__.startswith("torch.nn") or m.__module__.startswith("torch.ao.nn")
        return is_torch_nn and not isinstance(m, nn.Sequential) and not any(True for _ in m.children())

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:
                self.failed_path = path  # the innermost module whose forward failed
            raise


def _user_source_line(exc: BaseException) -> str:
    """The innermost traceback frame outside torch: the model code that failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename and "/qat/fx/" not in f.filename]
    if not frames:
        return "<unknown source line>"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {f.line}"


def trace_once(model: nn.Module, leaf_paths: tuple[str, ...]) -> fx.GraphModule:
    tracer = QatTracer(leaf_paths)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError... all mean "cannot trace"
        path = tracer.failed_path or ""
        raise UntraceableModelError(path, _user_source_line(exc), exc) from exc
    return fx.GraphModule(model, graph, model.__class__.__name__)


def trace(model: nn.Module, leaf_paths: tuple[str, ...] = (), fallback_to_leaf: bool = False) -> TraceResult:
    """Trace `model`; with fallback_to_leaf, each failing submodule becomes a leaf and tracing retries."""
    leaves = tuple(leaf_paths)
    while True:
        try:
            return TraceResult(trace_once(model, leaves), leaves)
        except UntraceableModelError as err:
            if not fallback_to_leaf or not err.module_path or err.module_path in leaves:
                raise
            leaves = leaves + (err.module_path,)
