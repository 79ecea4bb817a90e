"""The confidence stage: each teacher's fitted OOD statistics (StrataNet Eq. 2-4), fitted from a job's
held-out rows, saved beside the job, called on teacher outputs during distillation.

- :mod:`~dfkd_ray.confidence.estimator`: :class:`ConfidenceEstimator`, ``estimator(teacher_output)`` -> ``(B, N)``;
  :func:`teacher_confidences` (every teacher's, with the one-class rule).
- :mod:`~dfkd_ray.confidence.fitting`: :func:`fit_estimator` (one teacher's rows), :func:`fit_estimators`
  (every teacher's texts), :func:`fit_confidence` (a job's transfer set), :func:`separation_report` (the
  console lines of the label-free separation estimate).
- :mod:`~dfkd_ray.confidence.persistence`: :func:`save_estimators` / :func:`load_estimators`.

The pure Gaussian fitting, scoring and calibration functions are :mod:`dfkd_ray.math.confidence`.
"""

from dfkd_ray.confidence.estimator import ConfidenceEstimator, one_class_rule, teacher_confidences
from dfkd_ray.confidence.fitting import fit_confidence, fit_estimator, fit_estimators, heldout_rows, separation_report
from dfkd_ray.confidence.persistence import load_estimator, load_estimators, save_estimator, save_estimators

__all__ = ["ConfidenceEstimator", "fit_confidence", "fit_estimator", "fit_estimators", "heldout_rows",
           "load_estimator", "load_estimators", "one_class_rule", "save_estimator", "save_estimators",
           "separation_report", "teacher_confidences"]
