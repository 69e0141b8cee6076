#!/usr/bin/env python3
"""Split the benchmark's publish -> record latencies into their two legs.

    BENCH_WORKER_LOG=/tmp/worker.json BENCH_TRACE=1 BENCH_ONLY=5 \
        target/release/deps/pipeline-* --bench 2>/tmp/trace.log
    scripts/bench-latency-legs.py /tmp/worker.json /tmp/trace.log

For each record of the worker's rounds: "in" is from the benchmark's publish to
the worker's `published` log line (the broker's delivery, the wait for a free
prefetch slot, the handler), "out" from that line to the record's arrival at
the benchmark (the records queue). Prints the slowest records and the
percentiles of each leg.
"""

import collections
import datetime
import json
import sys


def published_at(worker_log):
    """task_id -> the times (Unix seconds) the worker logged `published`."""
    times = collections.defaultdict(list)
    with open(worker_log) as lines:
        for line in lines:
            if '"published"' not in line:
                continue
            entry = json.loads(line)
            stamp = datetime.datetime.strptime(entry["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
            at = stamp.replace(tzinfo=datetime.timezone.utc).timestamp()
            times[entry["task_id"]].append(at)
    return times


def legs(worker_log, trace):
    """(total, in, out) in ms for every traced record the worker published."""
    published = published_at(worker_log)
    rows = []
    with open(trace) as lines:
        for line in lines:
            fields = line.split()
            if len(fields) != 6 or fields[0] != "latency":
                continue
            task, received, total_ms = fields[1], float(fields[3]), float(fields[5])
            sent = received - total_ms / 1000
            # Task names repeat from round to round: the line within this record's flight.
            match = [p for p in published.get(task, []) if sent - 0.001 <= p <= received + 0.001]
            if match:
                rows.append((total_ms, (match[0] - sent) * 1000, (received - match[0]) * 1000))
    return rows


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    rows = legs(sys.argv[1], sys.argv[2])
    if not rows:
        sys.exit("no record of the trace matches a `published` line of the worker log")
    print(f"{len(rows)} records; the slowest:")
    for total, inbound, outbound in sorted(rows, reverse=True)[:10]:
        print(f"  total {total:8.1f} ms   in {inbound:8.1f} ms   out {outbound:6.1f} ms")
    for name, column in (("total", 0), ("in", 1), ("out", 2)):
        values = sorted(r[column] for r in rows)
        pct = lambda q: values[min(len(values) - 1, int(len(values) * q))]
        print(f"{name:>5}: p50 {pct(0.5):7.2f} ms   p99 {pct(0.99):7.2f} ms")


if __name__ == "__main__":
    main()
