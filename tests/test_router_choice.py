"""Which router a request goes to (deployments.router_choice): no Ray, no HTTP."""

from __future__ import annotations

from deployments.router_choice import RouterChoice

SYSTEM = list(range(100, 164))  # a 64-token system prompt: 4 blocks of 16


def test_without_a_shared_prefix_requests_go_to_the_least_loaded_in_turn():
    choice = RouterChoice(3, block_size=16)
    picks = [choice.pick([i, 1, 2], [0, 0, 0], [True] * 3) for i in range(6)]
    assert picks == [0, 1, 2, 0, 1, 2]  # ties in turn
    assert choice.pick([7], [5, 1, 3], [True] * 3) == 1  # else the least loaded


def test_a_shared_prefix_goes_where_it_went_before_unless_that_router_is_busy_or_down():
    choice = RouterChoice(2, block_size=16, slack=4)
    first = choice.pick([*SYSTEM, 1, 2, 3], [0, 0], [True, True])
    assert choice.pick([*SYSTEM, 9, 9], [0, 0], [True, True]) == first  # the system prompt's router
    assert choice.pick([*SYSTEM, 8], [3, 0] if first == 0 else [0, 3], [True, True]) == first  # within slack
    busy = [4, 0] if first == 0 else [0, 4]
    assert choice.pick([*SYSTEM, 7], busy, [True, True]) == 1 - first  # 4 more in flight: the other
    down = [first == 1, first == 0]
    assert choice.pick([*SYSTEM, 6], [0, 0], down) == 1 - first  # its router is down


def test_the_longest_remembered_prefix_decides():
    choice = RouterChoice(2, block_size=16)
    a = choice.pick(SYSTEM[:32] + [1] * 32, [0, 0], [True, True])  # shares 2 blocks with SYSTEM
    b = choice.pick(SYSTEM, [9, 0] if a == 0 else [0, 9], [True, True])  # a is busy: the other
    assert b != a
    assert choice.pick(SYSTEM + [5] * 20, [0, 0], [True, True]) == b  # 4 blocks match b, 2 match a
    assert choice.pick(SYSTEM[:32] + [1] * 32 + [2], [0, 0], [True, True]) == a


def test_every_router_down_still_picks_one_and_memory_is_bounded():
    choice = RouterChoice(2, block_size=4, capacity=10)
    assert choice.pick([1, 2, 3, 4], [0, 0], [False, False]) in (0, 1)  # it waits for one to come back
    for i in range(20):
        choice.pick([i] * 16, [0, 0], [True, True])
    assert len(choice.owner) == 10
