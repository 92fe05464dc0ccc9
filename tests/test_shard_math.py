"""Shard math without processes: uneven splits, GQA head assignment, unit ranges."""
import pytest

from autotp.sharding.math import assign_heads, contiguous, split_sizes, unit_ranges


@pytest.mark.parametrize("total,ws,expected", [(8, 3, [3, 3, 2]), (8, 4, [2, 2, 2, 2]), (130, 4, [33, 33, 32, 32]),
                                               (5, 5, [1] * 5), (7, 1, [7])])
def test_split_sizes(total, ws, expected):
    assert split_sizes(total, ws) == expected
    assert sum(split_sizes(total, ws)) == total


def test_contiguous_and_unit_ranges():
    assert contiguous([3, 3, 2]) == [(0, 3), (3, 6), (6, 8)]
    assert unit_ranges([2, 3, 5], 8) == [(16, 32), (40, 48)]
    assert unit_ranges([0, 0], 4) == [(0, 4), (0, 4)]  # a replicated head appears twice


@pytest.mark.parametrize("heads,kv,ws", [(8, 8, 3), (8, 4, 3), (8, 2, 3), (8, 2, 4), (8, 1, 4), (12, 4, 5),
                                         (32, 8, 3), (8, 4, 4), (6, 3, 4)])
def test_assign_heads_keeps_every_query_with_its_kv_head(heads, kv, ws):
    a = assign_heads(heads, kv, ws)
    group = heads // kv
    assert sorted(h for per in a.q_heads for h in per) == list(range(heads))  # every query head once
    for q, local_kv, g in zip(a.q_heads, a.kv_heads, a.groups):
        assert len(q) == len(local_kv) * g
        # repeat_kv semantics: local query head i reads local kv head i // g
        assert [local_kv[i // g] for i in range(len(q))] == [h // group for h in q]


def test_assign_heads_uneven_and_replicated():
    assert [len(q) for q in assign_heads(8, 8, 3).q_heads] == [3, 3, 2]
    few = assign_heads(8, 2, 4)  # fewer KV heads than ranks: each KV head on two ranks
    assert few.kv_heads == [[0], [0], [1], [1]] and few.groups == [2, 2, 2, 2]
    straddle = assign_heads(8, 2, 3)  # rank 1 holds query heads 3, 4, 5 of KV groups 0, 1, 1
    assert straddle.kv_heads[1] == [0, 1, 1] and straddle.groups[1] == 1


def test_assign_heads_errors():
    with pytest.raises(ValueError, match="larger than the number of attention heads"):
        assign_heads(4, 4, 5)
    with pytest.raises(ValueError, match="cannot be grouped"):
        assign_heads(8, 3, 2)
