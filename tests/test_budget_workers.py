"""A worker process's budget: set once, from MLWF_MAX_MEMORY at its first call, never over a server's flag."""

from __future__ import annotations

import pytest

from mlwf import budget


@pytest.fixture
def fresh_budget(monkeypatch):
    """This process's budget as a worker finds it at its start (put back afterwards)."""
    monkeypatch.setattr(budget, "_configured", False)
    monkeypatch.setattr(budget.MEMORY, "limit", budget.DEFAULT_LIMIT)


def test_a_worker_takes_its_limit_once_and_a_servers_flag_is_not_undone(fresh_budget):
    assert budget.configure_once("64MiB") == 64 << 20 and budget.MEMORY.limit == 64 << 20
    assert budget.configure_once("1GiB") == 64 << 20  # the first setting stands
    budget.configure(256 << 20)  # a server's --max-memory, at its start
    assert budget.configure_once(None) == 256 << 20


def test_a_worker_without_the_variable_keeps_the_default(fresh_budget):
    assert budget.configure_once(None) == budget.DEFAULT_LIMIT
