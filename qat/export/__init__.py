"""Export: self-describing int8 artifacts (safe to load) and ONNX QDQ models."""
from qat.export.artifact import ArtifactError, export, load
from qat.export.codecs import ExportError

__all__ = ["ArtifactError", "ExportError", "export", "load"]
