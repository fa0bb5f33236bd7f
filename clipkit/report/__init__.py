"""What people look at: PNG figures (retrieval grids, few-shot and loss curves, contact sheets) and
self-contained HTML reports."""
from .page import Section, write_report
from .plots import contact_sheet, plot_few_shot, plot_loss_curve, plot_retrieval_grid

__all__ = ["Section", "contact_sheet", "plot_few_shot", "plot_loss_curve", "plot_retrieval_grid", "write_report"]
