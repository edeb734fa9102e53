"""Export: self-describing int8 artifacts (safe to load) and ONNX QDQ models."""
from qat.artifact.artifact import ArtifactError, export, load
from qat.artifact.codecs import ExportError
from qat.artifact.onnx import OnnxExportError, export_onnx

__all__ = ["ArtifactError", "ExportError", "OnnxExportError", "export", "export_onnx", "load"]
