"""SyncCache's 20-step plans with shared guidance (SyncCacheConfig.share_guidance) against the plain model and
the shipped plan unshared, on the held-out clips, all in lockstep as `syncavatar bench cache` runs them. The
other plans are re-solved by DP from the errors the shipped plan's calibration recorded (no new calibration;
those errors were recorded unshared). Nothing else may run.

    .venv/bin/python docs/bench_cache_shared.py docs/bench_cache_shared.json 53,57,61,65
"""
import json
import sys

from engine.bench import bench_cache, print_table
from engine.calibrate import errors_from_meta
from engine.config import DEFAULT_CONFIG, load_config
from engine.model.avatar import load_model
from synccache import Schedule, SyncCacheConfig, plan


def main(out, reuses):
    cfg = load_config(DEFAULT_CONFIG)
    model = load_model(cfg.path(cfg.model.weights))
    sched = Schedule.load(cfg.path(cfg.cache.schedule))
    err = errors_from_meta(sched.meta)
    methods = [("none", "none", None),
               ("synccache", f"synccache(schedule {sched.reuse_count} reuses)", SyncCacheConfig(schedule=sched)),
               ("synccache", f"synccache(schedule {sched.reuse_count} reuses, shared)",
                SyncCacheConfig(schedule=sched, share_guidance=True))]
    for k in reuses:
        alt = plan(err, len(err), reuses=k, warmup=sched.meta.get("warmup", 1), max_run=sched.meta.get("max_run"),
                   spans=sched.spans)
        methods.append(("synccache", f"synccache(schedule {k} reuses, shared)",
                        SyncCacheConfig(schedule=alt, forecast=int(sched.meta.get("forecast", 0)), share_guidance=True)))
    res = bench_cache(model, methods, corpus="data/heldout", clips=6)
    print_table(res)
    json.dump(res, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], [int(k) for k in sys.argv[2].split(",")] if len(sys.argv) > 2 else [])
