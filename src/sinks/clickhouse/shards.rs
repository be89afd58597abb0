//! Straight to the shards (`[clickhouse] shard_urls`, docs/sinks.md, "ClickHouse cluster"):
//! each event goes to the shard the cluster's Distributed table would send it to —
//! `intHash64(event_id)` over the shards' weights — and is inserted into `{table}_local` on
//! one of that shard's replicas. The server behind `url` no longer parses, splits and
//! forwards every row; a shard that fails is retried alone, on its next replica.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::anyhow;

use super::client::ClickHouse;
use super::schema::Layout;
use crate::enrich::EnrichedEvent;
use crate::sinks::SinkError;

/// ClickHouse's `intHash64` function: the 64-bit finalizer of MurmurHash3 over the value
/// XORed with a constant. The Distributed table's sharding key is `intHash64(event_id)`,
/// the id's bits taken as unsigned.
fn int_hash64(x: u64) -> u64 {
    let mut x = x ^ 0x4cf2_d2ba_ae6d_a887;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

pub struct Shards {
    /// Slot → shard index: each shard holds as many slots as its weight, in shard order, and
    /// an event's slot is its key modulo the number of slots (ClickHouse's own selector).
    slots: Vec<usize>,
    shards: Vec<Shard>,
}

pub struct Shard {
    /// `shard_num` in `system.clusters`.
    number: u32,
    replicas: Vec<Replica>,
    /// The replica tried first: the one that took the last insert, the next one after a
    /// failure.
    current: AtomicUsize,
}

pub struct Replica {
    ch: ClickHouse,
    client: clickhouse::Client,
    /// The server said it is a replica of this shard (checked before its first insert).
    verified: AtomicBool,
}

impl Shards {
    /// How many shards.
    pub fn count(&self) -> usize {
        self.shards.len()
    }

    /// The shards of `[clickhouse] shard_urls`, weighted by the cluster's `system.clusters`
    /// on the server of `url`, which must list as many shards. Every replica is asked which
    /// shard it serves: a replica listed under the wrong shard is an error. With
    /// `all_must_answer` (`setup`) an unreachable replica is too; otherwise (`run`) it is
    /// logged and checked before its first insert.
    pub async fn connect(ch: &ClickHouse, all_must_answer: bool) -> anyhow::Result<Shards> {
        let cfg = ch.config();
        let weights = ch.shard_weights().await?;
        if weights.is_empty() {
            anyhow::bail!(
                "ClickHouse at {} knows no cluster {:?} (system.clusters); check [clickhouse] cluster and the servers' remote_servers",
                ch.url(),
                cfg.cluster
            );
        }
        if weights.len() != cfg.shard_urls.len() {
            anyhow::bail!(
                "[clickhouse] shard_urls lists {} shard(s), but cluster {:?} has {} (system.clusters on {}); list every shard's replicas, shards in remote_servers order",
                cfg.shard_urls.len(),
                cfg.cluster,
                weights.len(),
                ch.url()
            );
        }
        let mut slots = Vec::new();
        let mut shards = Vec::new();
        for (index, (&(number, weight), urls)) in weights.iter().zip(&cfg.shard_urls).enumerate() {
            slots.extend(std::iter::repeat_n(index, weight as usize));
            let replicas = urls
                .iter()
                .map(|url| {
                    let ch = ch.at(url);
                    Replica {
                        client: ch.in_database(),
                        ch,
                        verified: AtomicBool::new(false),
                    }
                })
                .collect();
            shards.push(Shard {
                number,
                replicas,
                current: AtomicUsize::new(0),
            });
        }
        if slots.is_empty() {
            anyhow::bail!(
                "every shard of cluster {:?} has weight 0; give at least one a weight",
                cfg.cluster
            );
        }
        for shard in &shards {
            for replica in &shard.replicas {
                match replica.verify(shard.number).await {
                    Ok(()) => {}
                    Err(SinkError::Transient { message, .. }) if !all_must_answer => {
                        tracing::warn!(
                            "{message}; its shard is checked again before it takes an insert"
                        )
                    }
                    Err(e) => return Err(anyhow!("{e}")),
                }
            }
        }
        Ok(Shards { slots, shards })
    }

    pub fn shard(&self, index: usize) -> &Shard {
        &self.shards[index]
    }

    /// The shard index of an event, as the Distributed table chooses it.
    pub fn shard_of(&self, event_id: i64) -> usize {
        let key = int_hash64(event_id as u64);
        self.slots[(key % self.slots.len() as u64) as usize]
    }

    /// `events` grouped by shard: `(shard index, its events)`, non-empty groups only.
    pub fn split<'e>(&self, events: &[&'e EnrichedEvent]) -> Vec<(usize, Vec<&'e EnrichedEvent>)> {
        let mut groups: Vec<Vec<&EnrichedEvent>> = vec![Vec::new(); self.shards.len()];
        for e in events {
            groups[self.shard_of(e.event_id)].push(e);
        }
        groups
            .into_iter()
            .enumerate()
            .filter(|(_, g)| !g.is_empty())
            .collect()
    }
}

impl Shard {
    /// One INSERT of `rows` into `table` on a replica of this shard checked to serve it:
    /// the replica that took the last insert, the next one after a transient failure.
    pub async fn insert(
        &self,
        table: &str,
        layout: Layout,
        rows: &[&EnrichedEvent],
    ) -> Result<(), SinkError> {
        let n = self.replicas.len();
        let at = self.current.load(Ordering::Relaxed) % n;
        let replica = &self.replicas[at];
        let result = match replica.verify(self.number).await {
            Ok(()) => super::write_rows(&replica.client, table, layout, rows)
                .await
                .map_err(|e| replica.ch.classify(&e)),
            Err(e) => Err(e),
        };
        if let Err(SinkError::Transient { .. }) = &result {
            let _ = self.current.compare_exchange(
                at,
                (at + 1) % n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        result.map_err(|e| e.in_context(&format!("shard {}", self.number)))
    }
}

impl Replica {
    /// Ask the server which shard of the cluster it serves, once.
    async fn verify(&self, shard: u32) -> Result<(), SinkError> {
        if self.verified.load(Ordering::Relaxed) {
            return Ok(());
        }
        let cluster = &self.ch.config().cluster;
        let own = self
            .ch
            .own_shards()
            .await
            .map_err(|e| match e.downcast_ref::<SinkError>() {
                Some(SinkError::Permanent { .. }) => SinkError::permanent(format!("{e}")),
                _ => SinkError::transient(format!("{e}")),
            })?;
        let url = self.ch.url();
        if own == [shard] {
            self.verified.store(true, Ordering::Relaxed);
            return Ok(());
        }
        Err(SinkError::permanent(if own.is_empty() {
            format!(
                "ClickHouse at {url} is not a node of cluster {cluster:?} (its system.clusters lists no entry for itself); fix [clickhouse] shard_urls, or leave it empty to insert through the Distributed table"
            )
        } else {
            format!(
                "ClickHouse at {url} is a replica of shard {own:?} of cluster {cluster:?}, but [clickhouse] shard_urls lists it under shard {shard}; list each shard's replicas in remote_servers order"
            )
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `SELECT x, intHash64(x)` for these `Int64` values, the same on ClickHouse 18.16.1 and
    /// 26.9 (chDB).
    #[test]
    fn int_hash64_is_clickhouses() {
        for (x, expected) in [
            (0i64, 4761183170873013810u64),
            (1, 10577349846663553072),
            (2, 18198135717204167749),
            (1_000_000, 14608560239930825669),
            (-1, 14600443904207254319),
            (123_456_789_012, 735944198880760888),
        ] {
            assert_eq!(int_hash64(x as u64), expected, "intHash64({x})");
        }
    }
}
