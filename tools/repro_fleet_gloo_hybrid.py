"""Paddle alone, no paddlemix: fleet's hybrid topology on 4 CPU (gloo) processes.

Why this file exists: the 4-process tensor parallel x sharding stage1 training test
(tests/test_train.py, xfail) fails inside ``fleet.init`` before any paddlemix code runs. This
script shows the same failure with nothing but Paddle, so the cause is on record and the test
can be turned back on when a Paddle release fixes it:

    python -m paddle.distributed.launch --nproc_per_node 4 tools/repro_fleet_gloo_hybrid.py

With Paddle 3.3.1 on CPU every rank fails while fleet creates its sub-groups
(``ProcessGroupGloo.create``: "connect [127.0.0.1]:PORT: Connection refused" or "TCP connection
reset by peer"); with ``--nproc_per_node 2`` (degrees 2 x 1) it completes.
"""
from __future__ import annotations

import argparse
import logging

import paddle
import paddle.distributed as dist
from paddle.distributed import fleet

logger = logging.getLogger("repro_fleet_gloo_hybrid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mp_degree", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    world = dist.get_world_size()
    mp = min(args.mp_degree, world)
    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": mp, "pp_degree": 1, "sharding_degree": world // mp}
    fleet.init(is_collective=True, strategy=strategy)
    hcg = fleet.get_hybrid_communicate_group()
    x = paddle.to_tensor([float(dist.get_rank())])
    dist.all_reduce(x, group=hcg.get_sharding_parallel_group())
    logger.info("rank %d: mp rank %d, sharding rank %d, sharding all_reduce %s", dist.get_rank(),
                hcg.get_model_parallel_rank(), hcg.get_sharding_parallel_rank(), x.numpy().tolist())


if __name__ == "__main__":
    main()
