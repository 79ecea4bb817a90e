"""CUDA-stream helpers of the Hugging Face engine (dfkd_ray.generation.streams), off CUDA."""

from __future__ import annotations

import pytest
import torch

from dfkd_ray.generation.streams import covered, interleave


def test_covered_is_the_length_of_a_union_of_intervals():
    assert covered([]) == 0.0
    assert covered([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.7), (2.5, 2.6)]) == pytest.approx(4.0)
    assert covered([(3.0, 4.0), (0.0, 10.0)]) == pytest.approx(10.0)


def test_interleave_resumes_parts_until_each_ends():
    seen = []

    def part(name, waits):
        for w in range(waits):
            seen.append((name, w))
            yield None
        seen.append((name, "end"))

    interleave([part("a", 2), part("b", 0), part("c", 1)], torch.device("cpu"))
    assert seen == [("a", 0), ("b", "end"), ("c", 0), ("a", 1), ("c", "end"), ("a", "end")]
    seen.clear()
    interleave([part("solo", 2)], torch.device("cpu"))
    assert seen == [("solo", 0), ("solo", 1), ("solo", "end")]
