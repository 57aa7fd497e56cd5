"""The report of a run: one self-contained HTML page with its figures embedded.

``write_report(run)`` writes ``RUN/report.html`` all or nothing and returns a
:class:`ReportResult`. Figures are drawn with matplotlib (Agg backend), imported only when a
report is built.
"""

from tzkcli.report.build import REPORT_NAME, ReportResult, build_report, write_report

__all__ = ["REPORT_NAME", "ReportResult", "build_report", "write_report"]
