"""Summarise a telemetry CSV of one live run (`syncavatar telemetry --csv t.csv`) into the JSON the README's
live results quote: chunks by kind and level, policy decisions, generation times, how long before their
deadlines first frames were ready, the server's latency estimate and A/V offset, queue depth, output fps,
the event loop's longest block and the RSS trend.

    .venv/bin/python docs/live/telemetry_summary.py t.csv "stop 14: Xeon with AMX, 2 cores" [SESSION] > docs/live/telemetry_60s.json

SESSION (the client JSON's "session") keeps one session's rows of a CSV that holds several runs.
"""
import csv
import json
import statistics
import sys
from collections import Counter

rows = [r for r in csv.DictReader(open(sys.argv[1])) if len(sys.argv) < 4 or r["session"] == sys.argv[3]]
num = lambda rs, k: [float(r[k]) for r in rs if r.get(k) not in (None, "")]
chunks = [r for r in rows if r["type"] == "chunk"]
stats = [r for r in rows if r["type"] == "second"]  # one row a second
gen = num(chunks, "gen_ms")
margin = [float(r["deadline_ms"]) - float(r["first_ready_ms"]) for r in chunks
          if r.get("first_ready_ms") not in (None, "") and r.get("deadline_ms") not in (None, "")]
rss = num(stats, "rss_mb")
print(json.dumps({
    "machine": sys.argv[2] if len(sys.argv) > 2 else "",
    "chunks": dict(Counter(f"{r['kind']} level {r['level']}" for r in chunks)),
    "decisions": sum(r["type"] == "decision" for r in rows),
    "gen_ms_median": round(statistics.median(gen), 1) if gen else None,
    "gen_ms_max": round(max(gen), 1) if gen else None,
    # how long before its deadline a generated chunk's first frame was ready (absent before stop 15)
    "first_frame_margin_ms_median": round(statistics.median(margin), 1) if margin else None,
    "first_frame_margin_ms_min": round(min(margin), 1) if margin else None,
    "latency_est_ms_median": round(statistics.median(num(chunks, "latency_est_ms")), 1),
    "server_av_offset_ms_median": round(statistics.median(num(chunks, "av_offset_ms")), 1),
    "ready_frames_max": max(num(chunks + stats, "ready_frames") or [0]),
    "fps_out_min": min(num(stats, "fps_out") or [0]),
    "loop_lag_max_ms": max(num(stats, "loop_lag_max_ms") or [0]),
    "rss_mb_first_last": [rss[0], rss[-1]] if rss else None,
}, indent=1))
