"""Expert parallelism: where a router's MoE layers send their tokens, and how they get there.

backend.py       ExpertBackend (submit / wait); InProcessExperts, the reference split into N local shards
wire.py          one layer batch for one shard as bytes: header, routing, hidden states
rendezvous.py    a router-shard pair group: the store, the key prefix, the transport (gloo, NCCL)
remote.py        the router's end: a ShardLink per shard, RemoteExperts with failover
server.py        the shard's end: ShardServer answers every router's layer batches
load.py          ExpertLoad: assignments per expert, round trips per shard, balance
eplb.py          hot-expert replication planned from the measured load
local_shards.py  shards as spawned processes without Ray (tests, benchmarks)
"""
