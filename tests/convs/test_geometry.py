"""Shared geometry: the border spans of an axis against a per-position reference, and the per-size cache."""

import pytest

from convs.geometry import SizeCache, axis_plan


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize(
    ("kernel", "stride", "dilation", "pad_before", "pad_after"),
    [
        (3, 1, 1, 1, 1),
        (3, 2, 1, 1, 1),
        (3, 1, 2, 2, 2),
        (4, 1, 1, 1, 2),
        (7, 2, 1, 3, 3),
        (3, 1, 1, 3, 3),
        (1, 1, 1, 0, 0),
    ],
)
def test_spans_split_positions_by_where_their_window_leaves(size, kernel, stride, dilation, pad_before, pad_after):
    try:
        plan = axis_plan(size, kernel, stride, dilation, pad_before, pad_after)
    except ValueError:
        pytest.skip("empty output")
    before, inside, after = plan.spans
    assert before[0] == 0 and before[1] == inside[0] and inside[1] == after[0] and after[1] == plan.out
    for i in range(plan.out):
        first = i * stride - pad_before
        last = first + (kernel - 1) * dilation
        expected = before if first < 0 else after if last >= size else inside  # leaving both sides: 'before'
        assert expected[0] <= i < expected[1]


def test_size_cache_drops_the_least_recently_used():
    cache = SizeCache(maxsize=2)
    computed = []

    def value(key):
        return cache.lookup(key, lambda: computed.append(key) or 10 * key)

    assert [value(1), value(2), value(1), value(3)] == [10, 20, 10, 30]
    assert computed == [1, 2, 3] and list(cache) == [1, 3]  # 2 went: 1 was used after it
    assert value(2) == 20 and computed == [1, 2, 3, 2] and list(cache) == [3, 2] and len(cache) == 2
