"""Under MirroredStrategy x2 on CPUs, exercise the collectives and write a report per replica."""

import json
import sys

import torch

import distsave

strategy = distsave.MirroredStrategy(devices=["cpu", "cpu"])
rank = strategy.replica_id
value = torch.tensor([1.0, 2.0]) * (rank + 1)
data = distsave.data.Dataset.from_tensor_slices(torch.arange(10)).batch(5)
shards = [t.tolist() for t in strategy.experimental_distribute_dataset(data)]
report = {
    "replicas": strategy.num_replicas_in_sync,
    "rank": rank,
    "sum": strategy.reduce("SUM", value).tolist(),
    "mean": strategy.reduce(distsave.ReduceOp.MEAN, value).tolist(),
    "sum_over_batch": strategy.reduce("SUM", torch.ones(rank + 2, 3), axis=0).tolist(),
    "gather": strategy.gather(torch.full((rank + 1,), float(rank))).tolist(),
    "broadcast": strategy.broadcast_object({"chief": rank}),
    "shards": shards,
    "run": strategy.run(lambda t: t * 2, args=(torch.tensor([rank]),)).tolist(),
    "threads": torch.get_num_threads(),
}
strategy.barrier()
with open(f"{sys.argv[1]}.{rank}.json", "w") as f:
    json.dump(report, f)
