"""Choosing a job's settings with a sweep, the engine side (no Ray): a trial's config and what it
shares with other trials (:mod:`~dfkd_ray.tuning.space`), the data-free proxy that scores a trial
without labels (:mod:`~dfkd_ray.tuning.proxy`), and the results a sweep writes
(:mod:`~dfkd_ray.tuning.results`). :mod:`dfkd_ray.orchestration.tune` runs the sweep on Ray Tune."""
