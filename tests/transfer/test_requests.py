"""The requests table: balanced, weighted by class, seeded by each request's identity."""

from __future__ import annotations

import collections

from dfkd_ray.labels import UnionLabelSpace
from dfkd_ray.transfer.requests import build_requests, request_seed


def test_requests_are_balanced_weighted_and_seeded():
    space = UnionLabelSpace.from_teachers({"a": ["x", "y"], "b": ["y", "z"]})
    reqs = build_requests({"a": ["x", "y"], "b": ["y", "z"]}, space, samples_per_class=4, job_seed=7,
                          class_weights={"Z": 0.5})
    counts = collections.Counter((r.teacher, r.teacher_class) for r in reqs)
    assert counts == {("a", 0): 4, ("a", 1): 4, ("b", 0): 4, ("b", 1): 2}
    assert [r.ordinal for r in reqs] == list(range(len(reqs)))
    assert len({r.sample_id for r in reqs}) == len(reqs)
    assert reqs[0].seed == request_seed(7, "a", 0, 0) != request_seed(8, "a", 0, 0)
    assert {r.label for r in reqs if r.teacher == "b" and r.teacher_class == 0} == {1}  # shared 'y'
