import pytest

from .cases import random_problem


@pytest.fixture
def make_problem():
    """Factory of small random problems (see cases.random_problem)."""
    return random_problem
