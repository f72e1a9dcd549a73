"""The self-contained HTML report of an optimize run."""

from compactai.report.html import render_report, write_report

__all__ = ["render_report", "write_report"]
