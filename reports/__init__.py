"""Report exporter: calibration and sampling-efficiency reports over run folders (HTML, Markdown, JSON).

`export_report` is imported on first use: it needs the `reports` extra (matplotlib, ArviZ), while
`mpts.reports.output_paths` (which `mpts replay --out` checks with) must import in the core alone.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_report"]


def __getattr__(name: str) -> Any:
    if name == "export_report":
        from .export import export_report

        return export_report
    raise AttributeError(f"module 'mpts.reports' has no attribute {name!r}")
