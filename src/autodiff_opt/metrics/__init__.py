"""FID through torch-fidelity: one feature extractor per process, cached reference statistics."""

from autodiff_opt.metrics.fid import FIDScorer, FIDStats, MetricError, ensure_registered

__all__ = ["FIDScorer", "FIDStats", "MetricError", "ensure_registered"]
