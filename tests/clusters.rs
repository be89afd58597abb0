//! The sinks against clusters the test support starts: a ClickHouse cluster of three 18.16
//! servers (two shards, the second with two replicas) coordinated by ZooKeeper, a Redis
//! Cluster, and a Redis master with its replica behind a sentinel. One binary for the heavy
//! cluster scenarios.

mod support;

use std::time::Duration;

use support::*;

const T: Duration = Duration::from_secs(180);

/// Content ids of the Redis scenarios' events.
const CONTENTS: i64 = 50;

/// The content rows 1..=CONTENTS.
fn add_contents(pg: &Postgres) {
    pg.psql(
        "engagement",
        &format!(
            "INSERT INTO content (content_id, content_type, length_seconds)
             SELECT g, 'video', 60 + g FROM generate_series(1, {CONTENTS}) g
             ON CONFLICT (content_id) DO NOTHING"
        ),
    );
}

/// Postgres and a configuration whose only sink is the Redis of `url`, set up, with the
/// content rows.
fn redis_scenario(url: &str) -> (Postgres, TestConfig) {
    let pg = Postgres::start();
    let cfg = TestConfig::new(
        &pg.url("engagement"),
        &format!("[redis]\nurl = \"{url}\"\n"),
    );
    let setup = cli(Some(&cfg.path), &["setup"], &[]);
    assert_eq!(setup.code, 0, "{setup:?}");
    add_contents(&pg);
    (pg, cfg)
}

/// A Redis master and its replica, once the replica follows it.
fn master_and_replica() -> (Redis, Redis) {
    let master = Redis::start();
    let replica = Redis::start_replica_of(&master);
    wait_for("the replica to follow its master", T, || {
        (replica
            .cli(&["INFO", "replication"])
            .contains("master_link_status:up")
            && master
                .cli(&["INFO", "replication"])
                .contains("state=online"))
        .then_some(())
    });
    (master, replica)
}

/// `rows` events in one transaction, spread over the CONTENTS content ids.
fn insert_events(pg: &Postgres, rows: usize) {
    pg.psql(
        "engagement",
        &format!(
            "INSERT INTO engagement_events (content_id, user_id, event_type, duration_ms, device)
             SELECT 1 + g % {CONTENTS}, g, 'play', g % 9000, 'web' FROM generate_series(1, {rows}) g"
        ),
    );
}

/// The sum of `content:count:*` over the CONTENTS ids, read with `cli`.
fn counted(cli: impl Fn(&[&str]) -> String) -> u64 {
    (1..=CONTENTS)
        .map(|c| {
            cli(&["GET", &format!("content:count:{c}")])
                .parse::<u64>()
                .unwrap_or(0)
        })
        .sum()
}

fn distributed_count(node: &ClickHouse) -> u64 {
    node.query("SELECT count() FROM engagement.events_enriched")
        .parse()
        .unwrap()
}

fn local_count(node: &ClickHouse) -> u64 {
    node.query("SELECT count() FROM engagement.events_enriched_local FINAL")
        .parse()
        .unwrap()
}

#[test]
fn a_clickhouse_cluster_gets_every_event_once_across_a_replica_and_an_engine_kill() {
    clickhouse_cluster_scenario(false);
}

/// The same with `shard_urls`: the engine inserts straight into each shard's local table,
/// choosing the shard as the Distributed table does, and fails over to shard 2's other
/// replica when the one it writes to dies.
#[test]
fn straight_to_the_shards_every_event_lands_on_its_shard_once() {
    clickhouse_cluster_scenario(true);
}

/// 20,000 events into the ClickHouse cluster, through the Distributed table or (`direct`)
/// straight to the shards; a replica of shard 2 stopped and the engine killed with -9
/// mid-stream.
fn clickhouse_cluster_scenario(direct: bool) {
    let mut cluster = ClickHouseCluster::start();
    let pg = Postgres::start();
    let shard_urls = if direct {
        // Shard 2's second replica first: it is the one stopped mid-stream.
        format!(
            "shard_urls = [[\"{}\"], [\"{}\", \"{}\"]]\n",
            cluster.nodes[0].url(),
            cluster.nodes[2].url(),
            cluster.nodes[1].url()
        )
    } else {
        String::new()
    };
    let cfg = TestConfig::new(
        &pg.url("engagement"),
        &format!(
            "[clickhouse]\nurl = \"{}\"\ncluster = \"{}\"\n{shard_urls}",
            cluster.url(),
            ClickHouseCluster::NAME
        ),
    );
    if direct {
        // Shards swapped, or one missing: setup names the mistake.
        let swapped = format!(
            "[[\"{}\", \"{}\"], [\"{}\"]]",
            cluster.nodes[1].url(),
            cluster.nodes[2].url(),
            cluster.nodes[0].url()
        );
        let setup_with = |urls: &str| {
            cli(
                Some(&cfg.path),
                &["setup"],
                &[("ENGAGEMENT_CDC__CLICKHOUSE__SHARD_URLS", urls)],
            )
        };
        let run = setup_with(&swapped);
        assert!(
            run.code != 0
                && run.stderr.contains(&format!(
                    "ClickHouse at {} is a replica of shard [2] of cluster \"{}\", but [clickhouse] shard_urls lists it under shard 1",
                    cluster.nodes[1].url(),
                    ClickHouseCluster::NAME
                )),
            "{run:?}"
        );
        let run = setup_with(&format!("[[\"{}\"]]", cluster.nodes[0].url()));
        assert!(
            run.code != 0
                && run
                    .stderr
                    .contains("shard_urls lists 1 shard(s), but cluster \"events_cluster\" has 2"),
            "{run:?}"
        );
    }
    let setup = cli(Some(&cfg.path), &["setup"], &[]);
    assert_eq!(setup.code, 0, "{setup:?}");
    assert_eq!(
        setup
            .stdout
            .contains("inserts go straight to events_enriched_local on 2 shards"),
        direct,
        "{setup:?}"
    );
    for node in &cluster.nodes {
        assert_eq!(
            node.query(
                "SELECT engine FROM system.tables WHERE database = 'engagement' ORDER BY name"
            ),
            "Distributed\nReplicatedReplacingMergeTree",
            "every node has the Distributed table and its replicated local table"
        );
    }
    // A second setup changes nothing.
    assert_eq!(cli(Some(&cfg.path), &["setup"], &[]).code, 0);

    let insert = |n: usize| {
        pg.psql(
            "engagement",
            &format!(
                "INSERT INTO engagement_events (content_id, user_id, event_type, duration_ms, device)
                 SELECT 1 + g % 3, g, 'play', g % 9000, 'web' FROM generate_series(1, {n}) g"
            ),
        );
    };
    let total = || -> u64 {
        pg.psql("engagement", "SELECT count(*) FROM engagement_events")
            .parse()
            .unwrap()
    };

    let mut engine = Engine::spawn(&cfg.path, &["run"], &[]);
    for _ in 0..5 {
        insert(1000);
    }
    // A replica of shard 2 dies mid-stream; its twin takes the inserts.
    wait_for("some rows in the cluster", T, || {
        (distributed_count(&cluster.nodes[0]) > 0).then_some(())
    });
    cluster.nodes[2].stop();
    for _ in 0..5 {
        insert(1000);
    }
    // kill -9 of the engine while it streams; the next one goes on from the checkpoint.
    engine.kill9();
    for _ in 0..5 {
        insert(1000);
    }
    let mut engine = Engine::spawn(&cfg.path, &["run"], &[]);
    for _ in 0..5 {
        insert(1000);
    }
    let n = total();
    assert_eq!(n, 20_000);
    // The replica that was down comes back. Rows written to it alone just before it
    // stopped were acknowledged by it (one replica per shard, internal_replication) and
    // reach its twin now; nothing acknowledged is lost.
    let nodes = &mut cluster.nodes;
    nodes[2].start_again_after_a_crash();
    let deadline = std::time::Instant::now() + T;
    loop {
        // The restarted replica answers before it has attached its tables: until then its
        // count is an error, not a failure.
        let (a, b, c) = (
            local_count(&nodes[0]),
            local_count(&nodes[1]),
            nodes[2].try_query("SELECT count() FROM engagement.events_enriched_local FINAL"),
        );
        if a + b == n && c.as_deref() == Ok(b.to_string().as_str()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "shard 1 has {a}, shard 2's replicas {b} and {c:?}, of {n}; engine log:\n{}",
            engine.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        local_count(&nodes[0]) > 0 && local_count(&nodes[1]) > 0,
        "both shards hold events"
    );
    // Exactly once through the Distributed table: every event, no event twice.
    let line =
        nodes[0].query("SELECT count(), uniqExact(event_id) FROM engagement.events_enriched FINAL");
    assert_eq!(line, format!("{n}\t{n}"));
    // Each event on the shard the Distributed table's sharding key chooses (both shards
    // weigh 1): the engine's choice is ClickHouse's.
    for (node, shard) in [(0, 0), (1, 1), (2, 1)] {
        assert_eq!(
            nodes[node].query(&format!(
                "SELECT count() FROM engagement.events_enriched_local WHERE intHash64(event_id) % 2 != {shard}"
            )),
            "0",
            "node {node} holds events of the other shard"
        );
    }
    if direct {
        // The engine found shard 2's second replica gone and wrote to its first.
        let log = engine.stderr();
        assert!(
            log.contains(&format!(
                "shard 2: cannot reach ClickHouse at {}",
                nodes[2].url()
            )),
            "the engine's log names the failing shard and replica:\n{log}"
        );
    }
    assert_eq!(engine.terminate(), 0);
}

/// Over a Redis Cluster of three masters with one replica each: 20,000 events over 50
/// content ids, the engine killed with -9 mid-stream, then the master of a content's count
/// killed with -9 mid-stream and its replica promoted; every count equals Postgres's, the
/// top-10 key holds the right scores, and the exactly-once state lives beside the keys it
/// guards (the cluster refuses anything else).
#[test]
fn a_redis_cluster_counts_every_event_once_across_a_master_and_an_engine_kill() {
    let mut cluster = RedisCluster::start();
    // No `cluster` key: the engine asks the server.
    let (pg, cfg) = redis_scenario(&cluster.url());
    let insert = |rows: usize| insert_events(&pg, rows);

    let mut engine = Engine::spawn(&cfg.path, &["run"], &[]);
    for _ in 0..10 {
        insert(500);
    }
    wait_for("some counts in the cluster", T, || {
        (counted(|a| cluster.cli(a)) > 0).then_some(())
    });
    engine.kill9();
    let mut engine = Engine::spawn(&cfg.path, &["run"], &[]);
    // The master of content 1's count dies while 10,000 more events stream in.
    let victim = cluster.master_of("content:count:1");
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..100 {
                insert(100);
            }
        });
        let deadline = std::time::Instant::now() + T;
        while counted(|a| cluster.cli(a)) <= 6_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "the stream did not go on: {} counted; engine log:\n{}",
                counted(|a| cluster.cli(a)),
                engine.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster.nodes[victim].stop();
    });
    // The nodes notice the master's death only after cluster-node-timeout: until then they
    // still report cluster_state:ok. Wait for the slot to have another master first.
    wait_for("a replica to take over the slot", T, || {
        cluster
            .try_master_of("content:count:1")
            .ok()
            .filter(|m| *m != victim)
    });
    cluster.wait_serving();
    let n: u64 = pg
        .psql("engagement", "SELECT count(*) FROM engagement_events")
        .parse()
        .unwrap();
    assert_eq!(n, 15_000);
    for _ in 0..10 {
        insert(500);
    }
    let n = n + 5_000;
    let deadline = std::time::Instant::now() + T;
    while counted(|a| cluster.cli(a)) != n {
        assert!(
            std::time::Instant::now() < deadline,
            "Redis counts {} of {n} events (Postgres has {}); engine status {:?}; engine log:\n{}",
            counted(|a| cluster.cli(a)),
            pg.psql("engagement", "SELECT count(*) FROM engagement_events"),
            cfg.engine_status(),
            engine.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let per_content = pg.psql(
        "engagement",
        "SELECT content_id, count(*) FROM engagement_events GROUP BY 1 ORDER BY 1",
    );
    for line in per_content.lines() {
        let (c, want) = line.split_once('|').unwrap();
        assert_eq!(
            cluster.cli(&["GET", &format!("content:count:{c}")]),
            want,
            "content {c}"
        );
    }
    // content:last: each content's latest event by (event_ts, event_id), written by the
    // call of its slot (which gets only that event when the count is in another slot).
    let latest = pg.psql(
        "engagement",
        "SELECT DISTINCT ON (content_id) content_id, id FROM engagement_events
          ORDER BY content_id, event_ts DESC, id DESC",
    );
    for line in latest.lines() {
        let (c, id) = line.split_once('|').unwrap();
        let last = cluster.cli(&["GET", &format!("content:last:{c}")]);
        assert!(
            last.starts_with(&format!("{{\"event_id\":{id},")),
            "content:last:{c} is {last}, Postgres's latest event is {id}"
        );
    }
    // The exactly-once state sits only where a count or a minute bucket needs it: a slot
    // whose keys are `content:last` ones only has no position of its own.
    let mut keys = std::collections::BTreeSet::new();
    for node in cluster.nodes.iter().filter(|n| n.running()) {
        keys.extend(node.cli(&["KEYS", "*"]).lines().map(str::to_string));
    }
    let slot = |k: &str| engagement_cdc::sinks::redis::key_slot(k);
    let guarded: std::collections::BTreeSet<u16> = keys
        .iter()
        .filter(|k| k.starts_with("content:count:") || k.starts_with("top:content:bucket:"))
        .map(|k| slot(k))
        .collect();
    let positions: Vec<&String> = keys
        .iter()
        .filter(|k| k.starts_with("engagement_cdc{") && k.ends_with("}:pos"))
        .collect();
    assert!(!positions.is_empty(), "no position in {keys:?}");
    for k in &positions {
        assert!(guarded.contains(&slot(k)), "{k} guards no count or bucket");
    }
    assert!(
        keys.iter()
            .any(|k| k.starts_with("content:last:") && !guarded.contains(&slot(k))),
        "no content:last key in a slot of its own: the case is not exercised"
    );
    // The top 10 of the last 10 minutes: what Postgres says for that window.
    wait_for("top:content:10m to match Postgres", T, || {
        let want = pg.psql(
            "engagement",
            "SELECT content_id || ' ' || count(*) FROM engagement_events
              WHERE event_ts >= date_trunc('minute', now()) - interval '9 minutes'
              GROUP BY content_id ORDER BY count(*) DESC, content_id::text DESC LIMIT 10",
        );
        let got = cluster.cli(&["ZREVRANGE", "top:content:10m", "0", "9", "WITHSCORES"]);
        let got: Vec<String> = got
            .lines()
            .collect::<Vec<_>>()
            .chunks(2)
            .map(|p| format!("{} {}", p[0], p.get(1).unwrap_or(&"")))
            .collect();
        (got.join("\n") == want).then_some(())
    });
    assert_eq!(engine.terminate(), 0);

    // A backfill of the same events under another key prefix, twice: the first applies
    // every event once, the second none, in every slot, including the minute buckets'
    // slots, where no count is kept (their calls log the ids all the same).
    let bf = TestConfig::new(
        &pg.url("engagement"),
        &format!(
            "[redis]\nurl = \"{}\"\nkey_prefix = \"bf:\"\n",
            cluster.url()
        ),
    );
    let at = |shift: &str| {
        pg.psql(
            "engagement",
            &format!(
                "SELECT to_char((now() {shift} interval '1 hour') AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
            ),
        )
    };
    let (start, end) = (at("-"), at("+"));
    for (round, want) in [
        (1, format!("inserted={n} duplicates=0")),
        (2, format!("inserted=0 duplicates={n}")),
    ] {
        let run = cli(
            Some(&bf.path),
            &[
                "backfill", "--start", &start, "--end", &end, "--sinks", "redis",
            ],
            &[],
        );
        assert_eq!(run.code, 0, "backfill {round}: {run:?}");
        assert!(
            run.stdout
                .trim_end()
                .ends_with(&format!("scanned={n} {want}")),
            "backfill {round}: {run:?}"
        );
        // A serving cluster takes each master's call whole: no fallback to one call a slot.
        assert!(
            !run.stderr.contains("calling slot by slot"),
            "backfill {round}: {run:?}"
        );
        for line in per_content.lines() {
            let (c, want) = line.split_once('|').unwrap();
            assert_eq!(
                cluster.cli(&["GET", &format!("bf:content:count:{c}")]),
                want,
                "backfill {round}, content {c}"
            );
        }
        let per_minute = pg.psql(
            "engagement",
            "SELECT to_char(date_trunc('minute', event_ts) AT TIME ZONE 'UTC', 'YYYYMMDDHH24MI'), count(*)
               FROM engagement_events GROUP BY 1 ORDER BY 1",
        );
        for line in per_minute.lines() {
            let (minute, want) = line.split_once('|').unwrap();
            let scores = cluster.cli(&[
                "ZRANGE",
                &format!("bf:top:content:bucket:{minute}"),
                "0",
                "-1",
                "WITHSCORES",
            ]);
            let sum: u64 = scores
                .lines()
                .skip(1)
                .step_by(2)
                .map(|v| v.parse::<u64>().unwrap())
                .sum();
            assert_eq!(sum.to_string(), want, "backfill {round}, minute {minute}");
        }
    }
}

/// A master and its replica behind a Redis Sentinel, reached with `redis+sentinel://`:
/// kill -9 of the engine, then of the master while events stream in; the sentinel
/// promotes the replica, the engine follows it, and every count is exact.
#[test]
fn a_sentinel_failover_loses_and_doubles_nothing() {
    let (mut master, replica) = master_and_replica();
    let sentinel = Sentinel::start(&master, "engagement");
    wait_for("the sentinel to find the replica", T, || {
        sentinel.knows_a_replica().then_some(())
    });
    let (pg, cfg) = redis_scenario(&sentinel.url());
    let insert = |rows: usize| insert_events(&pg, rows);

    let mut engine = Engine::spawn(&cfg.path, &["run"], &[]);
    for _ in 0..10 {
        insert(500);
    }
    wait_for("some counts on the master", T, || {
        (counted(|a| master.cli(a)) > 0).then_some(())
    });
    engine.kill9();
    let engine = Engine::spawn(&cfg.path, &["run"], &[]);
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..100 {
                insert(100);
            }
        });
        let deadline = std::time::Instant::now() + T;
        while counted(|a| master.cli(a)) <= 7_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "the stream did not go on: {} counted; engine log:\n{}",
                counted(|a| master.cli(a)),
                engine.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        master.stop();
    });
    wait_for("the sentinel to promote the replica", T, || {
        (sentinel.master_port() == Some(replica.port)).then_some(())
    });
    for _ in 0..10 {
        insert(500);
    }
    let n: u64 = pg
        .psql("engagement", "SELECT count(*) FROM engagement_events")
        .parse()
        .unwrap();
    assert_eq!(n, 20_000);
    let deadline = std::time::Instant::now() + T;
    while counted(|a| replica.cli(a)) != n {
        assert!(
            std::time::Instant::now() < deadline,
            "Redis counts {} of {n} events; engine status {:?}; engine log:\n{}",
            counted(|a| replica.cli(a)),
            cfg.engine_status(),
            engine.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let per_content = pg.psql(
        "engagement",
        "SELECT content_id, count(*) FROM engagement_events GROUP BY 1 ORDER BY 1",
    );
    for line in per_content.lines() {
        let (c, want) = line.split_once('|').unwrap();
        assert_eq!(
            replica.cli(&["GET", &format!("content:count:{c}")]),
            want,
            "content {c}"
        );
    }
    let mut engine = engine;
    assert_eq!(engine.terminate(), 0);
}

#[test]
fn a_batch_counts_as_written_only_once_a_replica_holds_it() {
    let (master, replica) = master_and_replica();
    // The replica stays stopped for a while below: the master must not drop it meanwhile
    // (a master without a connected replica has nothing to WAIT for).
    master.cli(&["CONFIG", "SET", "repl-timeout", "3600"]);
    let (pg, cfg) = redis_scenario(&master.url());
    let engine = Engine::spawn(&cfg.path, &["run"], &[]);
    insert_events(&pg, 500);
    wait_for("the first 500 events delivered", T, || {
        (cfg.counter("events_delivered") == Some(500)).then_some(())
    });
    let retries = cfg.counter("sink_retries").unwrap();

    // The replica stops acknowledging: the master applies the next write, but WAIT times
    // out, so it is not delivered (the checkpoint and the cursor stay) and is written again
    // after a backoff. (The write may hold only the start of the transaction: a loaded
    // machine can see the source cut its batch before the rest arrived, and the sink
    // retries that write until it is acknowledged before taking the next.)
    replica.hang();
    insert_events(&pg, 500);
    let deadline = std::time::Instant::now() + T;
    while !(counted(|a| master.cli(a)) > 500
        && cfg.counter("sink_retries").is_some_and(|n| n > retries))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the master does not hold any of the second insert with WAIT failing: {} counted, {:?} retries \
             (before: {retries}), {:?} delivered; master: {}\nengine log:\n{}",
            counted(|a| master.cli(a)),
            cfg.counter("sink_retries"),
            cfg.counter("events_delivered"),
            master.cli(&["INFO", "replication"]),
            engine.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        cfg.counter("events_delivered"),
        Some(500),
        "a batch no replica acknowledged counted as delivered; master: {}\nengine log:\n{}",
        master.cli(&["INFO", "replication"]),
        engine.stderr()
    );
    let health = &cfg.engine_status().unwrap()["sinks"]["redis"];
    assert_eq!(health["state"], "retrying", "{health}");
    assert!(
        health["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("acknowledged")),
        "{health}"
    );

    // Once it answers again the batch is delivered, and the writes made again meanwhile
    // changed nothing.
    replica.resume();
    wait_for("the second batch delivered", T, || {
        (cfg.counter("events_delivered") == Some(1000)).then_some(())
    });
    assert_eq!(counted(|a| master.cli(a)), 1000);
    wait_for("the replica to hold every count", T, || {
        (counted(|a| replica.cli(a)) == 1000).then_some(())
    });
}
