"""Export to ONNX with a parity check."""

from compactai.export.onnx import ParityReport, check_parity, export_onnx

__all__ = ["ParityReport", "check_parity", "export_onnx"]
