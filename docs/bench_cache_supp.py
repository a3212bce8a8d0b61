"""Supplementary lockstep run (stop 9): fills the speed range above the shipped default, where the main
bench (docs/bench_cache.json) had no SyncCache setting within 10% of TeaCache(1) at 5.07x.

    .venv/bin/python docs/bench_cache_supp.py data/heldout 6 docs/bench_cache_supp.json

SyncCache plans with 70 and 72 reuses are re-solved by the age-aware DP from the errors recorded in the
shipped schedule (as `bench cache` re-solves its other grid points), run next to the uncached model and
TeaCache(1) on the same held-out clips, all timed in lockstep.
"""
import sys

import torch

from engine.bench import bench_cache, print_matched, print_table, write_json
from engine.caching import cache_config
from engine.calibrate import errors_from_meta
from engine.model.avatar import load_model
from synccache import Schedule, SyncCacheConfig, plan

torch.set_num_threads(2)
corpus, clips, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = load_model("engine/weights/avatar.safetensors").eval()
shipped = Schedule.load("configs/synccache/ref-XS.json")
err = errors_from_meta(shipped.meta)
methods = [("none", "none", None)]
for k in (70, 72):
    alt = plan(err, 4, reuses=k, warmup=1, max_run=shipped.meta["max_run"], spans=shipped.spans)
    methods.append(("synccache", f"synccache(schedule {k} reuses)", SyncCacheConfig(schedule=alt, forecast=1)))
methods.append(("teacache", "teacache(1)", cache_config("teacache", 20, 1.0, calibration="configs/synccache/peers.json")))
result = bench_cache(model, methods, corpus=corpus, clips=clips, progress=False)
write_json(result, out)
print_table(result)
print()
print_matched(result)
