"""Export: self-describing int8 artifacts (safe to load) and ONNX QDQ models."""
from qat.export.artifact import ArtifactError, export, load
from qat.export.codecs import ExportError
from qat.export.onnx import OnnxExportError, export_onnx

__all__ = ["ArtifactError", "ExportError", "OnnxExportError", "export", "export_onnx", "load"]
