"""The suite's own plumbing: the order `make test` hands the files to its workers in (tests/conftest.py)."""

from __future__ import annotations

import pytest


def test_files_with_slow_tests_come_first_each_in_one_piece(request):
    items = request.session.items
    files = list(dict.fromkeys(item.path for item in items))
    runs = 1 + sum(a.path != b.path for a, b in zip(items, items[1:], strict=False))
    assert runs == len(files), "a file's tests must stay together (loadfile hands out whole files)"
    has_slow = [any("slow" in item.keywords for item in items if item.path == f) for f in files]
    if not any(has_slow):
        pytest.skip("no slow test selected in this run")
    assert has_slow == sorted(has_slow, reverse=True), [f.name for f in files]
    assert not all(has_slow), "the fast files come after the slow ones"
