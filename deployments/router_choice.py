"""RouterChoice: which router an ingress replica sends a request to (with --routers M > 1).

Prefix affinity first: each router's prefix cache holds the prompts it has served, so a request
whose prompt starts like one sent to router i (the same system prompt, an earlier turn of the
same chat) goes to router i, where those blocks are cached. Blocks are named as the prefix cache
names them (moe.engine.kv_cache.block_hashes), and the owner of each of the last `capacity` names sent
is remembered. The longest prefix remembered decides. A router with `slack` or more requests in
flight beyond the least loaded one is passed over for the least loaded (a hot system prompt
must not pile every request onto one router), and so is a router that is down. With no prefix
remembered: the least loaded router, ties taken in turn. All choices of a request (n > 1) share
its prompt and go together.

This is the ingress's own view (its requests in flight), not a cluster-wide one: with several
ingress replicas each balances its own share, as Ray Serve's power-of-two choices do.
"""

from __future__ import annotations

from collections import OrderedDict

from moe.engine.kv_cache import block_hashes


class RouterChoice:
    def __init__(
        self,
        num_routers: int,
        block_size: int,
        max_blocks: int = 64,  # prompt blocks looked at: the first 1024 tokens with 16-token blocks
        capacity: int = 100_000,  # block names remembered (~10 MB)
        slack: int = 8,
    ):
        self.num_routers = num_routers
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.capacity = capacity
        self.slack = slack
        self.owner: OrderedDict[bytes, int] = OrderedDict()  # block name -> the router sent it last
        self.turn = 0  # where the next tie goes

    def pick(self, prompt: list[int], in_flight: list[int], up: list[bool]) -> int:
        """The router for a request with this prompt, given each router's requests in flight and
        whether it is up (when none is, any: the request waits for one to come back)."""
        n = self.num_routers
        if n == 1:
            return 0
        hashes = list(block_hashes(prompt, self.block_size, self.max_blocks))
        candidates = [i for i in range(n) if up[i]] or list(range(n))
        least = min(candidates, key=lambda i: (in_flight[i], (i - self.turn) % n))
        chosen = least
        for h in reversed(hashes):  # the longest prefix sent before
            owner = self.owner.get(h)
            if owner is not None:
                if owner in candidates and in_flight[owner] < in_flight[least] + self.slack:
                    chosen = owner
                break
        if chosen == least:
            self.turn = (least + 1) % n
        for h in hashes:
            self.owner[h] = chosen
            self.owner.move_to_end(h)
        while len(self.owner) > self.capacity:
            self.owner.popitem(last=False)
        return chosen
