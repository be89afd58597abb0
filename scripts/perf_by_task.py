#!/usr/bin/env python3
"""Where the engine's time goes, by task, from a `perf` profile with call graphs.

    perf script -i FILE.perf > FILE.script
    scripts/perf_by_task.py FILE.script                  # share of samples by task
    scripts/perf_by_task.py FILE.script 'exc_page_fault'  # samples whose stack matches, by
                                                          # the first engine or library frame

A profile is what `BENCH_PERF=FILE cargo bench --bench e2e -- ...` records (docs/benchmarks.md).
A sample belongs to the first of these whose frame is on its stack: each sink's task, the
journal, the tracker, the status server, pgwire-replication's reader, the source's session
(decoding, enrichment, batching), sled, the HTTP and Redis clients' connections.
"""

import collections
import re
import sys

TASKS = [
    ("http sink", r"HttpSink"),
    ("redis sink", r"RedisSink"),
    ("clickhouse sink", r"ClickHouseSink"),
    ("journal", r"journal::"),
    ("tracker", r"tracker::|Tracker"),
    ("status server", r"ops::http::serve|axum|ops::server"),
    ("pgwire-replication reader", r"pgwire_replication::client::tokio_client::run_worker|ReplicationClient::spawn"),
    ("source (decode, enrich, batch)", r"Source::session"),
    ("sled", r"sled::"),
    ("reqwest connection", r"hyper::client::conn|hyper_util::client"),
    ("fred connection", r"fred::"),
    ("sink loop", r"SinkTask"),
    ("pipeline", r"pipeline::"),
]
APP = re.compile(r"engagement_cdc|clickhouse::|fred::|hyper::|reqwest|pgwire|sled::|serde_json|redis_protocol")
GENERIC = re.compile(r"alloc::|RawVec|realloc|malloc|bytes::|core::ptr::drop|drop_in_place|Arc<")


def stacks(path):
    cur = None
    with open(path) as f:
        for line in f:
            if line and not line[0].isspace():
                if cur:
                    yield cur
                cur = []
            elif cur is not None and line.strip():
                m = re.match(r"\s*[0-9a-f]+ (.*) \(", line)
                cur.append(m.group(1) if m else line.strip())
    if cur:
        yield cur


def clean(frame):
    return re.sub(r"\+0x[0-9a-f]+", "", frame)[:120]


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    all_stacks = list(stacks(sys.argv[1]))
    total = len(all_stacks) or 1
    counts = collections.Counter()
    if len(sys.argv) > 2:
        pattern = re.compile(sys.argv[2])
        for st in all_stacks:
            if any(pattern.search(f) for f in st):
                first = next((f for f in st if APP.search(f) and not GENERIC.search(f)), "other")
                counts[clean(first)] += 1
        print(f"{sum(counts.values())} of {total} samples match {sys.argv[2]!r}")
    else:
        for st in all_stacks:
            name = next(
                (n for n, p in TASKS if any(re.search(p, f) for f in st)),
                "other",
            )
            counts[name] += 1
        print(f"{total} samples")
    for name, n in counts.most_common(25):
        print(f"{100 * n / total:6.2f} %  {name}")


if __name__ == "__main__":
    main()
