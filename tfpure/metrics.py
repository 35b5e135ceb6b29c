"""Metrics as `model.compile` takes them: `tfpure.outputs` holds them; this module keeps the
names importable from here.

Example:
  >>> from tfpure import metrics, outputs
  >>> metrics.resolve_metrics is outputs.resolve_metrics
  True
"""

from tfpure.outputs import Accuracy, clone_metric, resolve_metrics

__all__ = ["Accuracy", "clone_metric", "resolve_metrics"]
