"""The static HTML report of a dataset: gallery, per-class statistics, the paper's figures, results."""

from .build import PAGE_SIZE, ReportError, ReportResult, build_report

__all__ = ["PAGE_SIZE", "ReportError", "ReportResult", "build_report"]
