"""Report exporter: calibration and sampling-efficiency reports over run folders (HTML, Markdown, JSON)."""

from .export import export_report

__all__ = ["export_report"]
