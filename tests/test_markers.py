"""Markers follow from the fixtures a test uses (conftest.FIXTURE_MARKERS), so `-m` selections are exact."""

from __future__ import annotations

import pytest


def test_a_test_that_uses_the_stack_is_marked_stack(stack, request: pytest.FixtureRequest) -> None:  # noqa: ANN001
    assert request.node.get_closest_marker("stack") is not None
    assert request.node.get_closest_marker("model") is None


def test_a_test_that_uses_a_model_is_marked_model(tiny_model: str, request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("model") is not None


def test_a_test_without_either_is_unmarked(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("stack") is None and request.node.get_closest_marker("model") is None
