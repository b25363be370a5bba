"""The suite's own plumbing: the order `make test` hands the files to its workers in (tests/conftest.py)."""

from __future__ import annotations

import itertools

import pytest


def test_files_with_slow_tests_come_first_each_in_one_piece(request):
    items = request.session.items
    files = [path for path, _ in itertools.groupby(item.path for item in items)]  # one entry per run of a file
    assert len(files) == len(set(files)), "a file's tests must stay together (loadfile hands out whole files)"
    slow_files = {item.path for item in items if "slow" in item.keywords}
    if not slow_files:
        pytest.skip("no slow test selected in this run")
    has_slow = [f in slow_files for f in files]
    assert has_slow == sorted(has_slow, reverse=True), [f.name for f in files]
    assert not all(has_slow), "the fast files come after the slow ones"
