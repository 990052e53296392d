"""The process's work budget: what inputs may make mlwf allocate at once, shared by concurrent work."""

import threading

import pytest

from mlwf import budget
from mlwf.budget import Budget, BudgetExceeded
from mlwf.errors import UsageError


def test_work_over_the_limit_is_refused_before_anything_is_taken():
    b = Budget(100 << 20)
    with pytest.raises(BudgetExceeded) as e:
        b.reserve(101 << 20, "image 3 (1x64000000 pixels)")
    assert not e.value.busy and not e.value.retryable
    assert b.used == 0
    assert "image 3 (1x64000000 pixels) needs 101 MiB" in str(e.value)
    assert "--max-memory / MLWF_MAX_MEMORY" in str(e.value)


def test_concurrent_work_shares_one_budget_and_gives_it_back():
    b = Budget(100 << 20)
    first = b.reserve(60 << 20, "request 1")
    with pytest.raises(BudgetExceeded) as e:
        b.reserve(60 << 20, "request 2")
    assert e.value.busy and e.value.retryable  # fits alone: worth retrying once the first ends
    first.release()
    first.release()  # idempotent
    assert b.used == 0
    with b.reserve(60 << 20, "request 2"):
        assert b.used == 60 << 20
    assert b.used == 0


def test_a_streaming_reservation_is_refused_at_the_first_growth_past_the_limit():
    b = Budget(16 << 20)
    with b.reserve(0, "a gzip body") as r:
        for _ in range(15):
            r.grow(1 << 20)
        with pytest.raises(BudgetExceeded) as e:
            r.grow(2 << 20)
        assert r.held == 15 << 20  # the refused growth took nothing
        assert e.value.need == 17 << 20 and not e.value.busy
    assert b.used == 0


def test_many_threads_never_hold_more_than_the_limit():
    b = Budget(10)
    peak, lock = [0], threading.Lock()

    def work():
        for _ in range(200):
            try:
                with b.reserve(3, "w"):
                    with lock:
                        peak[0] = max(peak[0], b.used)
            except BudgetExceeded:
                pass

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 0 < peak[0] <= 10 and b.used == 0


@pytest.mark.parametrize("text, expected", [("536870912", 512 << 20), ("512MiB", 512 << 20), ("1GiB", 1 << 30),
                                            (" 2gb ", 2 * 10**9), ("64M", 64 << 20)])
def test_sizes(text, expected):
    assert budget.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", " ", "inf", "nan", "-1", "1.5GiB", "12 parsecs", "1KiB", "9" * 40, "2TiB"])
def test_bad_sizes_name_the_variable(text):
    with pytest.raises(UsageError, match="MLWF_MAX_MEMORY"):
        budget.parse_size(text)
