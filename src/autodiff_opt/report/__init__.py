"""Tables (pandas), figures (plotly) and the exported schedule of a study."""

from autodiff_opt.report.export import export_schedule
from autodiff_opt.report.tables import trials_table
from autodiff_opt.report.write import write_report

__all__ = ["export_schedule", "trials_table", "write_report"]
