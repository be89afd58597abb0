//! The sinks against clusters the test support starts: a ClickHouse cluster of three 18.16
//! servers (two shards, the second with two replicas) coordinated by ZooKeeper. One binary
//! for the heavy cluster scenarios.

mod support;

use std::time::Duration;

use support::*;

const T: Duration = Duration::from_secs(180);

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
    let mut cluster = ClickHouseCluster::start();
    let pg = Postgres::start();
    let cfg = TestConfig::new(
        &pg.url("engagement"),
        &format!(
            "[clickhouse]\nurl = \"{}\"\ncluster = \"{}\"\n",
            cluster.url(),
            ClickHouseCluster::NAME
        ),
    );
    let setup = cli(Some(&cfg.path), &["setup"], &[]);
    assert_eq!(setup.code, 0, "{setup:?}");
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
    nodes[2].start_again();
    let deadline = std::time::Instant::now() + T;
    loop {
        let (a, b, c) = (
            local_count(&nodes[0]),
            local_count(&nodes[1]),
            local_count(&nodes[2]),
        );
        if a + b == n && b == c {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "shard 1 has {a}, shard 2's replicas {b} and {c}, of {n}; engine log:\n{}",
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
    assert_eq!(engine.terminate(), 0);
}
