//! Sink B — Redis (docs/sinks.md, "Redis"), exactly once in effect.
//!
//! Each write is one Lua script (`apply_batch.lua`, run with EVALSHA and reloaded on
//! NOSCRIPT) that applies only the new events' effects, aggregated here per content and
//! minute: one INCRBY per content, one ZINCRBY per bucket and content, one SET of
//! `content:last` per content, then rebuilds `top:content:10m`. Streamed events are new
//! when their position (commit LSN, index in the transaction) is after the one the script
//! keeps with the effects; backfilled ones when the id logs of the dedup horizon do not hold
//! them (docs/sinks.md, "Redis"). So a replay, a backfill overlap or `fred` re-sending the
//! script after a reconnect changes nothing.
//!
//! Keys (after `key_prefix`): `content:last:{id}`, `content:count:{id}`,
//! `top:content:bucket:{YYYYMMDDHHMM}`, `top:content:10m`, and the exactly-once state
//! `engagement_cdc:pos`, `engagement_cdc:ids:{hour}`, `engagement_cdc:bfids:{hour}`,
//! `engagement_cdc:bf`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use std::sync::Arc;

use anyhow::anyhow;
use fred::prelude::*;
use fred::types::config::ServerConfig;
use fred::types::scripts::Script;
use rustc_hash::FxHashMap;

use super::retry::RetryPolicy;
use super::{BoxFuture, Delivery, Sink, SinkError};
use crate::checks::redact_url;
use crate::enrich::{now_us, utc_parts, EnrichedEvent};
use crate::error::UsageError;
use crate::ops::metrics::Metrics;

mod config;
pub use config::{ClusterMode, RedisConfig};

/// One call's script: `apply` of apply_batch.lua on the call's arguments.
/// Nil from `apply` (it needs the per-event part the call left out) is answered -1: no
/// group before it, nothing counted.
const APPLY_BATCH: &str = concat!(
    include_str!("apply_batch.lua"),
    "local n = apply(ARGV)\nif n == nil then return -1 end\nreturn n\n"
);

/// On a Redis Cluster, one call per node for several hash slots (apply_groups.lua).
const APPLY_GROUPS: &str = concat!(
    include_str!("apply_batch.lua"),
    include_str!("apply_groups.lua")
);

/// Redis 7 refuses a script that touches keys of several hash slots unless it says so; the
/// line is a syntax error before Redis 7, which does not check.
const CROSS_SLOT_FLAG: &str = "#!lua flags=allow-cross-slot-keys\n";

/// How long a master's count of connected replicas is trusted before it is read again.
const REPLICAS_TTL: Duration = Duration::from_secs(10);

/// How long a count of 0 is trusted: a replica that connects is waited for from at most
/// this long after it connected, and a server without replicas is asked once a second
/// rather than once a batch (docs/sinks.md, "Redis Cluster").
const NO_REPLICAS_TTL: Duration = Duration::from_secs(1);

/// On a Redis Cluster: replace `top:content:10m` (KEYS[1]) with the member/score pairs of
/// ARGV, atomically.
const WRITE_TOP: &str = "redis.call('DEL', KEYS[1])
for i = 1, #ARGV, 1000 do
  local args = {}
  for k = i, math.min(#ARGV, i + 999), 2 do
    args[#args + 1] = ARGV[k + 1]
    args[#args + 1] = ARGV[k]
  end
  redis.call('ZADD', KEYS[1], unpack(args))
end
if #ARGV > 0 then redis.call('EXPIRE', KEYS[1], 120) end
return #ARGV / 2";

/// Events per script call: bounds how long one call holds Redis (tens of milliseconds in
/// the common case, where the script's work is per content, not per event; about twice that
/// when a replay or a backfill makes it check event by event).
const EVENTS_PER_CALL: usize = 40_000;

/// While catching up, how long a call waits for more batches (up to the write limit): at a
/// catch-up's rates (100,000 events a second and more) that nearly fills it, and nobody
/// waits for a catch-up to the millisecond. Writes of fresh events are never held.
const FILL_WAIT: Duration = Duration::from_millis(250);

/// Buckets kept: the current minute and the 14 before it (EXPIRE 900).
const RETENTION_MINUTES: i64 = 15;

/// The idle rebuild of `top:content:10m` runs at least this often.
const IDLE_REBUILD: Duration = Duration::from_secs(5);

pub struct RedisSink {
    client: Client,
    script: Script,
    /// Writes `top:content:10m` on a Redis Cluster (`write_top.lua`).
    top_script: Script,
    /// A Redis Cluster: one script call per node (per hash slot when that fails), `WAIT`
    /// for a replica.
    cluster: bool,
    /// On a Redis Cluster, the script of one call per node for several slots.
    group_script: Option<Script>,
    /// On a Redis Cluster, each master's connected replicas when last read.
    replicas: HashMap<fred::types::config::Server, (u32, Instant)>,
    prefix: String,
    url: String,
    last_rebuild: Instant,
    /// When the dashboard's copy of `top:content:10m` was last read.
    last_top: Option<Instant>,
    metrics: Arc<Metrics>,
    retry: RetryPolicy,
    /// How long the id logs are kept (`redis.dedup_horizon`).
    horizon: Duration,
    /// What a backfill has read of the logs (None until its first call).
    view: Option<LogView>,
    /// When `top:content:10m` was last written on a Redis Cluster.
    last_cluster_top: Option<Instant>,
}

/// For each hash slot, a short text whose slot it is: the hash tag that puts a slot's
/// exactly-once state (`engagement_cdc{TAG}:…`) beside the keys it guards.
fn slot_tag(slot: u16) -> &'static str {
    static TAGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); 16384];
        let mut left = tags.len();
        let mut n: u64 = 0;
        while left > 0 {
            let t = n.to_string();
            let s = key_slot(&t) as usize;
            if tags[s].is_empty() {
                tags[s] = t;
                left -= 1;
            }
            n += 1;
        }
        tags
    });
    &tags[slot as usize]
}

/// The namespace of the exactly-once state on one Redis.
const NAMESPACE: &str = "engagement_cdc";

/// `YYYYMMDDHHMM` of the UTC minute containing `us` (µs since 1970).
pub fn minute_key(us: i64) -> String {
    let p = utc_parts(us);
    format!(
        "{:04}{:02}{:02}{:02}{:02}",
        p.year, p.month, p.day, p.hour, p.minute
    )
}

/// `event_ts` with exactly six fraction digits, so timestamps compare as strings.
#[cfg(test)]
fn sortable_ts(us: i64) -> String {
    let mut out = Vec::with_capacity(27);
    write_sortable_ts(&mut out, us);
    String::from_utf8(out).expect("ASCII")
}

/// [`sortable_ts`] appended to `out`.
fn write_sortable_ts(out: &mut Vec<u8>, us: i64) {
    let p = utc_parts(us);
    if !(0..=9999).contains(&p.year) {
        let text = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            p.year, p.month, p.day, p.hour, p.minute, p.second, p.micros
        );
        out.extend_from_slice(text.as_bytes());
        return;
    }
    let mut digits = |v: u32, width: u32, after: u8| {
        for k in (0..width).rev() {
            out.push(b'0' + (v / 10u32.pow(k) % 10) as u8);
        }
        if after != 0 {
            out.push(after);
        }
    };
    digits(p.year as u32, 4, b'-');
    digits(p.month, 2, b'-');
    digits(p.day, 2, b'T');
    digits(p.hour, 2, b':');
    digits(p.minute, 2, b':');
    digits(p.second, 2, b'.');
    digits(p.micros, 6, b'Z');
}

/// An event id in the script's sortable form: 16 hex digits, the sign bit flipped.
fn hex_id(id: i64) -> String {
    format!("{:016x}", (id as u64) ^ (1 << 63))
}

/// A streamed event's position: commit LSN and index in its transaction, 24 hex digits.
fn position(e: &EnrichedEvent) -> String {
    format!("{:016x}{:08x}", e.source_lsn.0, e.tx_index)
}

/// `YYYYMMDDHH` of the UTC hour containing `us`.
fn hour_key(us: i64) -> String {
    let p = utc_parts(us);
    format!("{:04}{:02}{:02}{:02}", p.year, p.month, p.day, p.hour)
}

/// The ids as runs of consecutive ids (12 bytes each: first id, length; big-endian).
fn id_runs(events: &[&EnrichedEvent]) -> Vec<u8> {
    let mut ids: Vec<i64> = events.iter().map(|e| e.event_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut out = Vec::with_capacity(12 * 4);
    let mut k = 0;
    while k < ids.len() {
        let first = ids[k];
        let mut len: u32 = 1;
        while k + (len as usize) < ids.len()
            && len < u32::MAX
            && ids[k + len as usize] == first.wrapping_add(len as i64)
            && first.checked_add(len as i64).is_some()
        {
            len += 1;
        }
        out.extend_from_slice(&first.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        k += len as usize;
    }
    out
}

/// What the script needs besides the events: where its state lives and, for a backfill,
/// how much of each log the engine has already read.
pub struct CallContext<'a> {
    /// `engagement_cdc`, or with a hash tag on a Redis Cluster.
    pub namespace: &'a str,
    /// The hours of the dedup horizon (`YYYYMMDDHH`), with the lengths of their ids and
    /// bfids logs already read (0 for the stream).
    pub hours: &'a [(String, u64, u64)],
    /// Seconds the logs are kept after their last write.
    pub log_ttl: u64,
    /// What this call does to `top:content:10m` (one Redis; nothing on a cluster).
    pub top: TopMode,
    /// On a Redis Cluster, the hash slot this call writes: it keeps the counts, the
    /// `content:last` and the buckets whose keys are in that slot, and nothing else.
    pub slot: Option<u16>,
    /// Whether a streamed call carries the per-event part (28 bytes an event, most of the
    /// call's bytes), which the script reads only when it must decide event by event (a
    /// replay crossing `NS:pos`, a batch meeting backfilled ids, a first call). Without
    /// it, the script answers so before writing anything, and the engine calls again with
    /// it (`run_batch_script`). A backfill's calls always carry it.
    pub per_event: bool,
}

/// What a call does to `top:content:10m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopMode {
    /// Nothing: a Redis Cluster builds it apart.
    None,
    /// Keep it equal to the union of the window's buckets: add the call's new events to it,
    /// rebuild it (ZUNIONSTORE) when the window moved to another minute or it is missing.
    Keep,
    /// Rebuild it with ZUNIONSTORE (the idle rebuild).
    Rebuild,
}

/// The hash slot of a key on a Redis Cluster.
pub fn key_slot(key: &str) -> u16 {
    fred::util::redis_keyslot(key.as_bytes())
}

/// `EVALSHA` of `script` with `args()` on the node of `key`; a server without the script
/// (NOSCRIPT: restarted, failed over, flushed) has it loaded and gets the call again.
/// fred's `evalsha_with_reload` does the same but copies every argument beforehand in case
/// they are needed again — a few percent of the engine's CPU for a catch-up's large calls
/// (docs/benchmarks.md); here they are built again only when it happens.
async fn run_script<R: FromValue>(
    client: &Client,
    script: &Script,
    key: String,
    args: impl Fn() -> Vec<Value>,
) -> Result<R, fred::error::Error> {
    match script.evalsha(client, vec![key.clone()], args()).await {
        Err(e) if e.details().starts_with("NOSCRIPT") => {
            script.load(client).await?;
            script.evalsha(client, vec![key], args()).await
        }
        result => result,
    }
}

/// A batch or groups script call (`args(per_event)`), first without the per-event part: when
/// the script answers that it needs it (-1 - what the groups before the one that asked
/// applied), the call is made again with it. Returns the events new to Redis.
async fn run_batch_script(
    client: &Client,
    script: &Script,
    key: String,
    args: impl Fn(bool) -> Vec<Value>,
) -> Result<u64, fred::error::Error> {
    let n: i64 = run_script(client, script, key.clone(), || args(false)).await?;
    if n >= 0 {
        return Ok(n as u64);
    }
    let before = (-1 - n) as u64;
    let again: i64 = run_script(client, script, key, || args(true)).await?;
    if again < 0 {
        return Err(fred::error::Error::new(
            ErrorKind::Unknown,
            "ERR the batch script asked for the per-event part of a call that carried it",
        ));
    }
    Ok(before + again as u64)
}

/// The script's ARGV for `events` (all streamed or all backfilled), at wall-clock time
/// `now_us`: the text arguments and the binary ones, in the order `apply_batch.lua`
/// documents. Per content and per (minute, content) the counts are aggregated here, so the
/// script's common case does no work per event.
pub fn script_args(
    prefix: &str,
    ctx: &CallContext<'_>,
    events: &[&EnrichedEvent],
    now_us: i64,
) -> Vec<Value> {
    const MINUTE: i64 = 60_000_000;
    let now_minute = now_us.div_euclid(MINUTE);
    let streamed = events.first().is_some_and(|e| e.source_lsn.0 > 0);
    let per_event = ctx.per_event || !streamed;
    // (content_id, latest event index, events)
    let mut contents: Vec<(i64, usize, u64)> = Vec::new();
    // The latest event's (event_ts, event_id) of each content, beside it rather than read
    // from the event each time (the events of a call are megabytes: a read from the
    // cache's far levels per event).
    let mut latest_keys: Vec<(i64, i64)> = Vec::new();
    let mut content_index: FxHashMap<i64, usize> = FxHashMap::default();
    let mut buckets: Vec<String> = Vec::new();
    let mut bucket_index: FxHashMap<i64, usize> = FxHashMap::default();
    let mut pairs: Vec<(usize, usize, u64)> = Vec::new();
    let mut pair_index: FxHashMap<(usize, usize), usize> = FxHashMap::default();
    let mut blob = Vec::with_capacity(if per_event { events.len() * 28 } else { 0 });
    let (mut lo, mut hi) = (i64::MAX, i64::MIN);
    for (i, e) in events.iter().enumerate() {
        lo = lo.min(e.event_id);
        hi = hi.max(e.event_id);
        let key = (e.event_ts_us, e.event_id);
        let c = *content_index.entry(e.content_id).or_insert_with(|| {
            contents.push((e.content_id, i, 0));
            latest_keys.push(key);
            contents.len()
        });
        let entry = &mut contents[c - 1];
        entry.2 += 1;
        if key > latest_keys[c - 1] {
            latest_keys[c - 1] = key;
            entry.1 = i;
        }
        let minute = e.event_ts_us.div_euclid(MINUTE);
        // 0: outside retention, or (on a cluster) the bucket's key is in another slot.
        let b = if minute > now_minute - RETENTION_MINUTES {
            match bucket_index.get(&minute) {
                Some(b) => *b,
                None => {
                    let key = minute_key(minute * MINUTE);
                    let here = ctx.slot.is_none_or(|s| {
                        key_slot(&format!("{prefix}top:content:bucket:{key}")) == s
                    });
                    let b = if here {
                        buckets.push(key);
                        buckets.len()
                    } else {
                        0
                    };
                    bucket_index.insert(minute, b);
                    b
                }
            }
        } else {
            0
        };
        if b > 0 {
            let k = *pair_index.entry((b, c)).or_insert_with(|| {
                pairs.push((b, c, 0));
                pairs.len() - 1
            });
            pairs[k].2 += 1;
        }
        if per_event {
            blob.extend_from_slice(&e.event_id.to_be_bytes());
            blob.extend_from_slice(&(c as i32).to_be_bytes());
            blob.extend_from_slice(&(b as i32).to_be_bytes());
            blob.extend_from_slice(&e.source_lsn.0.to_be_bytes());
            blob.extend_from_slice(&e.tx_index.to_be_bytes());
        }
    }
    // What the call does per content: 'c' its count, 'l' its content:last (on a Redis
    // Cluster each key is written by the call of its slot).
    let roles: Vec<&'static str> = contents
        .iter()
        .map(|(content_id, _, _)| match ctx.slot {
            None => "cl",
            Some(s) => {
                let count = key_slot(&format!("{prefix}content:count:{content_id}")) == s;
                let last = key_slot(&format!("{prefix}content:last:{content_id}")) == s;
                match (count, last) {
                    (true, true) => "cl",
                    (true, false) => "c",
                    (false, true) => "l",
                    (false, false) => "-",
                }
            }
        })
        .collect();
    if ctx.slot.is_some() && pairs.is_empty() && roles.iter().all(|r| !r.contains('c')) {
        // A slot's share that writes only content:last keys keeps no exactly-once state:
        // the short form, the content and its latest event only.
        let lasts: Vec<usize> = (0..contents.len()).filter(|&c| roles[c] == "l").collect();
        let mut args = Args::with_capacity(5 + 4 * lasts.len() + 3 * ctx.hours.len());
        args.text(prefix);
        args.text(ctx.namespace);
        args.text("l");
        args.int(lasts.len());
        for c in lasts {
            let (content_id, latest, _) = contents[c];
            let e = events[latest];
            args.int(content_id);
            args.write(|out| write_sortable_ts(out, e.event_ts_us));
            args.int(e.event_id);
            args.write(|out| e.write_json(out));
        }
        args.hours(ctx.hours);
        return args.finish();
    }
    let mut args = Args::with_capacity(30 + buckets.len() + contents.len());
    args.text(prefix);
    args.text(ctx.namespace);
    args.text(if streamed { "s" } else { "b" });
    match (streamed, events.first(), events.last()) {
        (true, Some(f), Some(l)) => {
            args.text(&position(f));
            args.text(&position(l));
        }
        _ => {
            args.text("");
            args.text("");
        }
    }
    let (lo, hi) = if events.is_empty() { (0, 0) } else { (lo, hi) };
    args.text(&hex_id(lo));
    args.text(&hex_id(hi));
    args.text(&hour_key(now_us));
    args.int(ctx.log_ttl);
    args.int(events.len());
    args.int(contents.len());
    args.int(buckets.len());
    args.int(pairs.len());
    args.text(match ctx.top {
        TopMode::None => "0",
        TopMode::Keep => "1",
        TopMode::Rebuild => "2",
    });
    for b in &buckets {
        args.text(b);
    }
    if ctx.top != TopMode::None {
        for back in 0..10 {
            args.text(&minute_key((now_minute - back) * MINUTE));
        }
    }
    // Per content and per (bucket, content), packed in one argument each: thousands of
    // arguments a call cost the client and Redis more per argument than their bytes
    // (docs/benchmarks.md, "The Redis call's contents packed"). The JSON of each content's
    // latest event follows as an argument of its own (empty where the call does not write
    // its content:last).
    let mut packed = Vec::with_capacity(contents.len() * 64);
    for ((content_id, latest, n), role) in contents.iter().zip(&roles) {
        let e = events[*latest];
        put_short_text(&mut packed, |out| {
            out.extend_from_slice(itoa::Buffer::new().format(*content_id).as_bytes())
        });
        packed.extend_from_slice(&(*latest as i32 + 1).to_be_bytes());
        packed.extend_from_slice(&(*n as i64).to_be_bytes());
        let count = u8::from(role.contains('c'));
        let last = role.contains('l');
        packed.push(count | u8::from(last) << 1);
        // The latest event only where this call writes its content:last.
        if last {
            put_short_text(&mut packed, |out| write_sortable_ts(out, e.event_ts_us));
            put_short_text(&mut packed, |out| {
                out.extend_from_slice(itoa::Buffer::new().format(e.event_id).as_bytes())
            });
        } else {
            packed.extend_from_slice(&[0, 0]);
        }
    }
    args.value(Value::Bytes(packed.into()));
    let mut packed = Vec::with_capacity(pairs.len() * 16);
    for (b, c, n) in pairs {
        packed.extend_from_slice(&(b as i32).to_be_bytes());
        packed.extend_from_slice(&(c as i32).to_be_bytes());
        packed.extend_from_slice(&(n as i64).to_be_bytes());
    }
    args.value(Value::Bytes(packed.into()));
    for ((_, latest, _), role) in contents.iter().zip(&roles) {
        if role.contains('l') {
            args.write(|out| events[*latest].write_json(out));
        } else {
            args.text("");
        }
    }
    args.value(Value::Bytes(id_runs(events).into()));
    args.value(Value::Bytes(blob.into()));
    args.hours(ctx.hours);
    args.finish()
}

/// The text `write` appends, preceded by its length in one byte, as `struct.unpack`'s `Bc0`
/// reads it (ids and times: at most 27 bytes, 35 for a year past 9999).
fn put_short_text(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.push(0);
    write(out);
    let len = out.len() - at - 1;
    debug_assert!(len <= 255);
    out[at] = len as u8;
}

/// A script call's arguments as they are built: the text of every argument in one buffer,
/// each argument a slice of it, so that a call's arguments (one JSON per content besides
/// the packed ones) are one allocation rather than one or two each, and numbers are written
/// by `itoa` rather than through `format!` (docs/benchmarks.md, "The Redis call's arguments
/// in one buffer").
struct Args {
    text: Vec<u8>,
    parts: Vec<Part>,
}

enum Part {
    /// The end of an argument's text in the buffer (it starts where the one before ended).
    Text(usize),
    /// An argument of its own (the binary ones).
    Value(Value),
}

impl Args {
    fn with_capacity(n: usize) -> Args {
        Args {
            text: Vec::with_capacity(n * 8),
            parts: Vec::with_capacity(n),
        }
    }

    fn text(&mut self, s: &str) {
        self.write(|out| out.extend_from_slice(s.as_bytes()));
    }

    fn int(&mut self, v: impl itoa::Integer) {
        self.write(|out| out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes()));
    }

    fn write(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        f(&mut self.text);
        self.parts.push(Part::Text(self.text.len()));
    }

    fn value(&mut self, v: Value) {
        self.parts.push(Part::Value(v));
    }

    /// The number of hours of the dedup horizon, then per hour: HOUR, and the lengths of its
    /// ids and bfids logs a backfill has read (the last arguments of every call).
    fn hours(&mut self, hours: &[(String, u64, u64)]) {
        self.int(hours.len());
        for (h, ids, bf) in hours {
            self.text(h);
            self.int(*ids);
            self.int(*bf);
        }
    }

    fn finish(self) -> Vec<Value> {
        let text = bytes::Bytes::from(self.text);
        let mut start = 0;
        self.parts
            .into_iter()
            .map(|p| match p {
                Part::Text(end) => {
                    let v = Value::Bytes(text.slice(start..end));
                    start = end;
                    v
                }
                Part::Value(v) => v,
            })
            .collect()
    }
}

/// The hours whose logs may still exist at `now_us` with `horizon`: from the hour the
/// oldest kept log was written in to the next hour (another engine's clock may run ahead).
pub fn horizon_hours(now_us: i64, horizon: Duration) -> Vec<String> {
    const HOUR: i64 = 3_600_000_000;
    let now_hour = now_us.div_euclid(HOUR);
    let back = (horizon.as_secs() as i64 + 3599) / 3600 + 1;
    (now_hour - back..=now_hour + 1)
        .map(|h| hour_key(h * HOUR))
        .collect()
}

/// Ids read from the logs, as disjoint ranges (first → last): what a backfill must not
/// apply again.
#[derive(Debug, Default)]
pub struct IdRanges {
    ranges: std::collections::BTreeMap<i64, i64>,
}

impl IdRanges {
    /// Add the runs of a log (12 bytes each), merging ranges that meet or overlap.
    pub fn add_runs(&mut self, raw: &[u8]) {
        for run in raw.chunks_exact(12) {
            let first = i64::from_be_bytes(run[..8].try_into().expect("8 bytes"));
            let len = u32::from_be_bytes(run[8..].try_into().expect("4 bytes"));
            if len == 0 {
                continue;
            }
            let last = first.saturating_add(len as i64 - 1);
            self.insert(first, last);
        }
    }

    fn insert(&mut self, mut first: i64, mut last: i64) {
        if let Some((&f, &l)) = self.ranges.range(..=first).next_back() {
            if l >= first.saturating_sub(1) {
                first = f;
                last = last.max(l);
            }
        }
        let after: Vec<(i64, i64)> = self
            .ranges
            .range(first..=last.saturating_add(1))
            .map(|(f, l)| (*f, *l))
            .collect();
        for (f, l) in after {
            self.ranges.remove(&f);
            last = last.max(l);
        }
        self.ranges.insert(first, last);
    }

    pub fn contains(&self, id: i64) -> bool {
        self.ranges
            .range(..=id)
            .next_back()
            .is_some_and(|(_, l)| *l >= id)
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// What a backfill has read of the logs: per hour the lengths read, and the ids.
#[derive(Debug, Default)]
struct LogView {
    read: HashMap<String, (u64, u64)>,
    ids: IdRanges,
}

/// The value of `name` in an `INFO` (or `CLUSTER INFO`) answer: `name:value` lines.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
}

/// `WAIT` until one replica of the master behind `node` holds its writes (2 s), when it has
/// a connected replica; `replicas` caches each master's count (`key`) for `REPLICAS_TTL`
/// while positive. An error when no replica acknowledged.
async fn wait_node<C>(
    replicas: &mut HashMap<fred::types::config::Server, (u32, Instant)>,
    key: fred::types::config::Server,
    name: &str,
    node: &C,
) -> Result<(), String>
where
    C: fred::interfaces::ServerInterface + Sync,
{
    let count = match replicas.get(&key) {
        // A positive count is checked by WAIT itself; a count of 0 is read again after 1 s.
        Some((n, at)) if *n > 0 && at.elapsed() < REPLICAS_TTL => *n,
        Some((0, at)) if at.elapsed() < NO_REPLICAS_TTL => 0,
        _ => {
            let info: String = node
                .info(Some(fred::types::InfoKind::Replication))
                .await
                .map_err(|e| format!("INFO replication on {name}: {e}"))?;
            let n: u32 = info_field(&info, "connected_slaves")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            replicas.insert(key.clone(), (n, Instant::now()));
            n
        }
    };
    if count == 0 {
        return Ok(());
    }
    match node.wait::<i64>(1, 2000).await {
        Ok(n) if n >= 1 => Ok(()),
        failed => {
            // Read the replica count again next time: the replica may be gone.
            replicas.remove(&key);
            Err(match failed {
                Err(e) => format!("WAIT on {name}: {e}"),
                Ok(_) => format!("no replica of {name} acknowledged the write within 2 s"),
            })
        }
    }
}

/// Build a client for `config` and wait for it to connect (10 s at most).
async fn connect_client(config: Config, url: &str) -> anyhow::Result<Client> {
    let client = Builder::from_config(config)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(5);
            c.internal_command_timeout = Duration::from_secs(10);
            // A re-sent script is harmless (the position kept with the effects), but a few
            // attempts are enough: the retry policy takes over after that.
            c.max_command_attempts = 3;
        })
        .with_performance_config(|p| {
            p.default_command_timeout = Duration::from_secs(10);
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
        .build()
        .map_err(|e| anyhow!("cannot configure the Redis client for {url}: {e}"))?;
    let init = client.init();
    match tokio::time::timeout(Duration::from_secs(10), init).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(e)) => {
            // fred keeps only the text of the rustls error.
            if let Some(why) = crate::tls::explain_text(e.details()) {
                return Err(anyhow!("cannot connect to Redis at {url}: {why}"));
            }
            Err(anyhow!(
                "cannot connect to Redis at {url}: {e}; is it running? check [redis] url (ENGAGEMENT_CDC__REDIS__URL)"
            ))
        }
        Err(_) => Err(anyhow!(
            "cannot connect to Redis at {url}: no answer within 10 s; check [redis] url and the server"
        )),
    }
}

impl RedisSink {
    /// Connect and check that the server answers.
    pub async fn connect(cfg: &RedisConfig, metrics: Arc<Metrics>) -> anyhow::Result<RedisSink> {
        let url = redact_url(&cfg.url);
        let mut config = if cfg.is_sentinel() {
            // The master the sentinels name, found again through them after a failover.
            let s = cfg.sentinel()?;
            Config {
                server: ServerConfig::Sentinel {
                    hosts: s
                        .sentinels
                        .iter()
                        .map(|(h, p)| fred::types::config::Server::new(h.as_str(), *p))
                        .collect(),
                    service_name: s.service,
                },
                username: s.username,
                password: s.password.map(|p| p.0),
                database: s.database,
                ..Config::default()
            }
        } else {
            Config::from_url(&cfg.url).map_err(|e| anyhow!("redis.url {url:?} is invalid: {e}"))?
        };
        // Our rustls settings (roots, client certificate) instead of the crate's defaults.
        config.tls = cfg.tls()?.map(fred::types::config::TlsConfig::from);
        if let Some(password) = cfg.password()? {
            if config.password.is_some() {
                return Err(UsageError::new(
                    "redis.url has a password and redis.password (or password_file) is set too; keep one",
                )
                .into());
            }
            config.password = Some(password.expose().to_string());
        }
        if !cfg.username.is_empty() {
            config.username = Some(cfg.username.clone());
        }
        let centralized = matches!(config.server, ServerConfig::Centralized { .. });
        let to_cluster = |mut config: Config| -> anyhow::Result<Config> {
            if let ServerConfig::Centralized { server } = &config.server {
                config.server = ServerConfig::Clustered {
                    hosts: vec![server.clone()],
                    // Rediscover through any node of the last slot map, so the cluster is
                    // found again when the node of the URL is the one that died.
                    policy: fred::types::config::ClusterDiscoveryPolicy::UseCache,
                };
                Ok(config)
            } else {
                Err(anyhow!(
                    "redis.url {url:?} does not name one server; with redis.cluster = true name one node of the cluster (redis://HOST:PORT)"
                ))
            }
        };
        let (client, cluster) = match cfg.cluster {
            ClusterMode::On => (connect_client(to_cluster(config)?, &url).await?, true),
            mode => {
                let client = connect_client(config.clone(), &url).await?;
                let info: String = client
                    .info(Some(fred::types::InfoKind::Cluster))
                    .await
                    .map_err(|e| anyhow!("cannot read INFO cluster from Redis at {url}: {e}"))?;
                let is_node = info_field(&info, "cluster_enabled") == Some("1");
                match (is_node, mode) {
                    (false, _) => (client, false),
                    (true, ClusterMode::Off) => {
                        return Err(anyhow!(
                            "Redis at {url} is a Redis Cluster node and redis.cluster = false; set redis.cluster = true (or remove it) to write to the cluster"
                        ))
                    }
                    (true, _) if !centralized => (client, false),
                    (true, _) => {
                        let state: String = client.cluster_info().await.map_err(|e| {
                            anyhow!("cannot read CLUSTER INFO from Redis at {url}: {e}")
                        })?;
                        let serving = info_field(&state, "cluster_state");
                        if serving != Some("ok") {
                            return Err(anyhow!(
                                "the Redis Cluster of {url} is not serving (CLUSTER INFO says {}); finish creating it (every slot assigned, e.g. redis-cli --cluster create) or point [redis] url at a standalone Redis",
                                serving.map_or("no cluster_state".to_string(), |v| format!("cluster_state:{v}"))
                            ));
                        }
                        let _ = client.quit().await;
                        (connect_client(to_cluster(config)?, &url).await?, true)
                    }
                }
            }
        };
        let script = Script::from_lua(APPLY_BATCH);
        let top_script = Script::from_lua(WRITE_TOP);
        let group_script = if cluster {
            let info: String = client
                .info(Some(fred::types::InfoKind::Server))
                .await
                .map_err(|e| anyhow!("cannot read INFO server from Redis at {url}: {e}"))?;
            let major: u32 = info_field(&info, "redis_version")
                .and_then(|v| v.split('.').next()?.parse().ok())
                .unwrap_or(0);
            let flag = if major >= 7 { CROSS_SLOT_FLAG } else { "" };
            Some(Script::from_lua(format!("{flag}{APPLY_GROUPS}")))
        } else {
            None
        };
        for s in [&script, &top_script]
            .into_iter()
            .chain(group_script.as_ref())
        {
            s.load(&client)
                .await
                .map_err(|e| anyhow!("cannot load the batch script into Redis at {url}: {e}"))?;
        }
        Ok(RedisSink {
            client,
            script,
            top_script,
            cluster,
            group_script,
            replicas: HashMap::new(),
            prefix: cfg.key_prefix.clone(),
            url,
            last_rebuild: Instant::now(),
            last_top: None,
            metrics,
            retry: RetryPolicy::until_success(),
            horizon: cfg.dedup_horizon()?,
            view: None,
            last_cluster_top: None,
        })
    }

    /// Apply events (any number); returns how many were new to Redis. Transient failures
    /// are retried until they succeed; a script error is permanent.
    pub async fn apply(&mut self, events: &[&EnrichedEvent]) -> Result<u64, SinkError> {
        let mut inserted = 0;
        if events.is_empty() {
            if self.cluster {
                self.write_top_cluster().await?;
            } else {
                self.call(&[], &[]).await?;
            }
            return Ok(0);
        }
        let mut rest = events;
        while !rest.is_empty() {
            // Streamed and backfilled events go in separate calls (the first have positions).
            let streamed = rest[0].source_lsn.0 > 0;
            // A cluster's call per node holds each master for about a third of the work:
            // 80,000 events, as before the single server's calls grew to 40,000.
            let per_call = if self.cluster {
                2 * EVENTS_PER_CALL
            } else {
                EVENTS_PER_CALL
            };
            let n = rest
                .iter()
                .take(per_call)
                .take_while(|e| (e.source_lsn.0 > 0) == streamed)
                .count();
            let (chunk, tail) = rest.split_at(n);
            inserted += match (self.cluster, streamed) {
                (true, _) => self.call_cluster(chunk).await?,
                (false, true) => self.call(chunk, &[]).await?,
                (false, false) => self.call_backfill(chunk).await?,
            };
            rest = tail;
        }
        if self.cluster
            && self
                .last_cluster_top
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.write_top_cluster().await?;
        }
        self.last_rebuild = Instant::now();
        self.refresh_top().await;
        Ok(inserted)
    }

    /// On a Redis Cluster: one script call per hash slot the events' keys fall in (its
    /// counts, `content:last` and buckets, with the exactly-once state of that slot beside
    /// them), all sent at once; then `WAIT` until a replica of every master written holds
    /// the writes. A failover that lost writes before a replica had them is met by running
    /// the calls again: each call skips what its slot already holds.
    async fn call_cluster(&mut self, events: &[&EnrichedEvent]) -> Result<u64, SinkError> {
        const MINUTE: i64 = 60_000_000;
        let now_minute = now_us().div_euclid(MINUTE);
        // Each event goes to the slots of its content's count, its content:last and its
        // minute's bucket (each slot once), in one group per slot.
        let mut groups: Vec<(u16, Vec<&EnrichedEvent>)> = Vec::new();
        let mut group_of_slot: FxHashMap<u16, usize> = FxHashMap::default();
        let mut group = |slot: u16| {
            *group_of_slot.entry(slot).or_insert_with(|| {
                groups.push((slot, Vec::new()));
                groups.len() - 1
            })
        };
        // Per content: the groups of its count and content:last (the same when one slot);
        // per minute: its bucket's.
        let mut content_groups: FxHashMap<i64, (usize, usize)> = FxHashMap::default();
        let mut bucket_groups: FxHashMap<i64, usize> = FxHashMap::default();
        let mut targets: Vec<[usize; 3]> = Vec::with_capacity(events.len());
        let p = &self.prefix;
        for e in events {
            let (count, last) = *content_groups.entry(e.content_id).or_insert_with(|| {
                (
                    group(key_slot(&format!("{p}content:count:{}", e.content_id))),
                    group(key_slot(&format!("{p}content:last:{}", e.content_id))),
                )
            });
            let minute = e.event_ts_us.div_euclid(MINUTE);
            let bucket = if minute > now_minute - RETENTION_MINUTES {
                *bucket_groups.entry(minute).or_insert_with(|| {
                    group(key_slot(&format!(
                        "{p}top:content:bucket:{}",
                        minute_key(minute * MINUTE)
                    )))
                })
            } else {
                usize::MAX
            };
            targets.push([count, last, bucket]);
        }
        // A content's `content:last` keeps its latest event by (event_ts, event_id), and
        // setting it again changes nothing: where its slot is not its count's, that slot's
        // call needs the content's latest event only (not every event, logged again).
        let mut latest: FxHashMap<i64, usize> = FxHashMap::default();
        for (i, e) in events.iter().enumerate() {
            let at = latest.entry(e.content_id).or_insert(i);
            let cur = events[*at];
            if (e.event_ts_us, e.event_id) > (cur.event_ts_us, cur.event_id) {
                *at = i;
            }
        }
        for (i, (e, [count, last, bucket])) in events.iter().zip(targets).enumerate() {
            groups[count].1.push(*e);
            let to_last = last != count && latest[&e.content_id] == i;
            if to_last {
                groups[last].1.push(*e);
            }
            if bucket != usize::MAX && bucket != count && !(bucket == last && to_last) {
                groups[bucket].1.push(*e);
            }
        }
        let per_slot: std::collections::BTreeMap<u16, Vec<&EnrichedEvent>> =
            groups.into_iter().collect();
        // A backfill's calls read the slot's logs whole (offsets 0): the engine keeps no
        // copy of 16,384 slots' logs.
        let hours: Vec<(String, u64, u64)> = horizon_hours(now_us(), self.horizon)
            .into_iter()
            .map(|h| (h, 0, 0))
            .collect();
        let mut inserted = 0;
        let mut attempt = 0u32;
        let mut unacknowledged: Option<String> = None;
        loop {
            inserted += match self.call_nodes(&per_slot, &hours).await {
                Ok(n) => n,
                Err(e) => {
                    // A slot moved, a node failed over, a connection broke: slot by slot,
                    // with retries (what a node's call applied is skipped by its slots).
                    tracing::warn!("redis at {}: {e}; calling slot by slot", self.url);
                    let sync = self.client.sync_cluster();
                    let _ = tokio::time::timeout(Duration::from_secs(5), sync).await;
                    let calls = per_slot
                        .iter()
                        .map(|(slot, evs)| self.call_slot(*slot, evs, &hours));
                    let done = futures_util::future::try_join_all(calls).await?;
                    done.iter().sum::<u64>()
                }
            };
            if let Some(e) = &unacknowledged {
                // The calls ran, but the batch is not written until replicas have it.
                self.metrics.health.failing("redis", e, false);
            }
            match self.wait_replicas(per_slot.keys().copied()).await {
                Ok(()) => {
                    if unacknowledged.is_some() {
                        self.metrics.health.ok("redis");
                    }
                    return Ok(inserted);
                }
                Err(e) => {
                    attempt += 1;
                    unacknowledged = Some(self.unacknowledged(attempt, &e).await);
                }
            }
        }
    }

    /// A batch no replica acknowledged: say so, count a retry, back off before it is written
    /// again (what the master, or a replica promoted since, holds is skipped then).
    async fn unacknowledged(&self, attempt: u32, e: &str) -> String {
        let delay = Duration::from_millis(100 * 2u64.pow(attempt.min(6)));
        tracing::warn!(
            "redis at {}: {e}; writing the batch again in {delay:?} (what Redis already holds is skipped)",
            self.url
        );
        self.metrics.sink_retry("redis");
        // Failing until a replica acknowledges the batch (the caller says so then).
        let reason = format!("redis at {}: {e}", self.url);
        self.metrics.health.failing("redis", &reason, false);
        tokio::time::sleep(delay).await;
        reason
    }

    /// One call per master for the slots it serves in the cached slot map (apply_groups.lua),
    /// all at once; one attempt each. An error names the first call that failed.
    async fn call_nodes(
        &self,
        per_slot: &std::collections::BTreeMap<u16, Vec<&EnrichedEvent>>,
        hours: &[(String, u64, u64)],
    ) -> Result<u64, String> {
        let script = self.group_script.as_ref().ok_or("no group script")?;
        let state = self
            .client
            .cached_cluster_state()
            .ok_or("the cluster's slot map is not known yet")?;
        let mut nodes: Vec<(&fred::types::config::Server, Vec<u16>)> = Vec::new();
        for slot in per_slot.keys() {
            let server = state
                .get_server(*slot)
                .ok_or_else(|| format!("no node serves slot {slot}"))?;
            match nodes.iter_mut().find(|(s, _)| *s == server) {
                Some((_, slots)) => slots.push(*slot),
                None => nodes.push((server, vec![*slot])),
            }
        }
        let text = |s: String| Value::from(s);
        let mut shared = Args::with_capacity(1 + 3 * hours.len());
        shared.hours(hours);
        let shared = shared.finish();
        let now = now_us();
        let log_ttl = self.horizon.as_secs() + 3600;
        let shared = &shared;
        let calls = nodes.into_iter().map(|(server, slots)| {
            let n = slots.len();
            // The first slot's position key routes the call to its node.
            let key = format!("{}{NAMESPACE}{{{}}}:pos", self.prefix, slot_tag(slots[0]));
            let args = move |per_event: bool| {
                let mut args = vec![
                    text(slots.len().to_string()),
                    text(shared.len().to_string()),
                ];
                args.extend(shared.iter().cloned());
                for slot in &slots {
                    let namespace = format!("{NAMESPACE}{{{}}}", slot_tag(*slot));
                    let ctx = CallContext {
                        namespace: &namespace,
                        hours: &[],
                        log_ttl,
                        top: TopMode::None,
                        slot: Some(*slot),
                        per_event,
                    };
                    let mut group = script_args(&self.prefix, &ctx, &per_slot[slot], now);
                    // The number of hours (0 here): the groups share the hours.
                    group.pop();
                    args.push(text(group.len().to_string()));
                    args.extend(group);
                }
                args
            };
            async move {
                run_batch_script(&self.client, script, key, args)
                    .await
                    .map_err(|e| format!("the call for {n} slots on {server}: {e}"))
            }
        });
        let done = futures_util::future::join_all(calls).await;
        let mut inserted = 0;
        for d in done {
            inserted += d?;
        }
        Ok(inserted)
    }

    /// One slot's call, retried until it succeeds.
    async fn call_slot(
        &self,
        slot: u16,
        events: &[&EnrichedEvent],
        hours: &[(String, u64, u64)],
    ) -> Result<u64, SinkError> {
        let namespace = format!("{NAMESPACE}{{{}}}", slot_tag(slot));
        let pos_key = format!("{}{namespace}:pos", self.prefix);
        let what = || format!("the batch script for slot {slot} ({} events)", events.len());
        self.retry
            .run("redis", &what, Some(&self.metrics), || async {
                let args = |per_event| {
                    let ctx = CallContext {
                        namespace: &namespace,
                        hours,
                        log_ttl: self.horizon.as_secs() + 3600,
                        top: TopMode::None,
                        slot: Some(slot),
                        per_event,
                    };
                    script_args(&self.prefix, &ctx, events, now_us())
                };
                match run_batch_script(&self.client, &self.script, pos_key.clone(), args).await {
                    Ok(n) => Ok(n),
                    Err(e) => {
                        // A node that stopped answering may have been failed over: ask a
                        // live node for the slot map before the next attempt.
                        let sync = self.client.sync_cluster();
                        let _ = tokio::time::timeout(Duration::from_secs(5), sync).await;
                        Err(classify(&e, &self.url))
                    }
                }
            })
            .await
            .map_err(|exhausted| exhausted.error)
    }

    /// `WAIT` on every master that owns one of `slots` and has a connected replica, until
    /// one replica acknowledges (2 s); an error when one does not.
    async fn wait_replicas(&mut self, slots: impl Iterator<Item = u16>) -> Result<(), String> {
        let state = self
            .client
            .cached_cluster_state()
            .ok_or("the cluster's slot map is not known yet")?;
        let mut servers: Vec<fred::types::config::Server> = Vec::new();
        for slot in slots {
            if let Some(server) = state.get_server(slot) {
                if !servers.contains(server) {
                    servers.push(server.clone());
                }
            }
        }
        for server in servers {
            let node = self.client.with_cluster_node(server.clone());
            let name = server.to_string();
            wait_node(&mut self.replicas, server, &name, &node).await?;
        }
        Ok(())
    }

    /// On a Redis Cluster: `top:content:10m` from the last 10 minute buckets, read one by
    /// one (they live in other slots) and written in one call on its own slot.
    async fn write_top_cluster(&mut self) -> Result<(), SinkError> {
        const MINUTE: i64 = 60_000_000;
        self.last_cluster_top = Some(Instant::now());
        let now_minute = now_us().div_euclid(MINUTE);
        let mut sum: HashMap<String, f64> = HashMap::new();
        for back in 0..10 {
            let key = format!(
                "{}top:content:bucket:{}",
                self.prefix,
                minute_key((now_minute - back) * MINUTE)
            );
            let what = || format!("reading {key}");
            let members: Vec<(String, f64)> = self
                .retry
                .run("redis", &what, Some(&self.metrics), || async {
                    self.client
                        .zrange(&key, 0, -1, None, false, None, true)
                        .await
                        .map_err(|e| classify(&e, &self.url))
                })
                .await
                .map_err(|exhausted| exhausted.error)?;
            for (member, score) in members {
                *sum.entry(member).or_insert(0.0) += score;
            }
        }
        let top_key = format!("{}top:content:10m", self.prefix);
        let args: Vec<String> = sum
            .into_iter()
            .flat_map(|(m, s)| [m, s.to_string()])
            .collect();
        let what = || format!("writing {top_key}");
        self.retry
            .run("redis", &what, Some(&self.metrics), || async {
                let args = || args.iter().map(|a| Value::from(a.as_str())).collect();
                let _: i64 = run_script(&self.client, &self.top_script, top_key.clone(), args)
                    .await
                    .map_err(|e| classify(&e, &self.url))?;
                Ok(())
            })
            .await
            .map_err(|exhausted| exhausted.error)
    }

    /// At most every 2 s, read `top:content:10m` for the dashboard. Display only: a failure
    /// is logged and the old copy kept.
    async fn refresh_top(&mut self) {
        if self
            .last_top
            .is_some_and(|t| t.elapsed() < Duration::from_secs(2))
        {
            return;
        }
        self.last_top = Some(Instant::now());
        let key = format!("{}top:content:10m", self.prefix);
        let read = self
            .client
            .zrevrange::<Vec<(String, f64)>, _>(&key, 0, 9, true);
        match tokio::time::timeout(Duration::from_secs(2), read).await {
            Ok(Ok(top)) => self.metrics.top_content.set(top),
            Ok(Err(e)) => tracing::debug!("cannot read {key} for the dashboard: {e}"),
            Err(_) => tracing::debug!("reading {key} for the dashboard timed out"),
        }
    }

    /// One Redis: the batch script, then, when the master has a replica, `WAIT` until one
    /// holds the writes (a failover, as Sentinel makes, loses only what no replica had);
    /// when none acknowledges, the call is made again (what the master kept is skipped).
    async fn call(
        &mut self,
        events: &[&EnrichedEvent],
        hours: &[(String, u64, u64)],
    ) -> Result<u64, SinkError> {
        let mut inserted = 0;
        let mut attempt = 0u32;
        let mut unacknowledged: Option<String> = None;
        loop {
            inserted += self.call_once(events, hours).await?;
            if events.is_empty() {
                return Ok(inserted);
            }
            if let Some(e) = &unacknowledged {
                // The script ran, but the batch is not written until a replica has it.
                self.metrics.health.failing("redis", e, false);
            }
            let key = fred::types::config::Server::new("", 0);
            match wait_node(&mut self.replicas, key, &self.url, &self.client).await {
                Ok(()) => {
                    if unacknowledged.is_some() {
                        self.metrics.health.ok("redis");
                    }
                    return Ok(inserted);
                }
                Err(e) => {
                    attempt += 1;
                    unacknowledged = Some(self.unacknowledged(attempt, &e).await);
                }
            }
        }
    }

    /// The batch script once, its transient failures retried until it succeeds.
    async fn call_once(
        &self,
        events: &[&EnrichedEvent],
        hours: &[(String, u64, u64)],
    ) -> Result<u64, SinkError> {
        let what = || format!("the batch script ({} events)", events.len());
        let stream_hours: Vec<(String, u64, u64)>;
        let hours = if hours.is_empty() {
            stream_hours = horizon_hours(now_us(), self.horizon)
                .into_iter()
                .map(|h| (h, 0, 0))
                .collect();
            &stream_hours[..]
        } else {
            hours
        };
        self.retry
            .run("redis", &what, Some(&self.metrics), || async {
                // Arguments are rebuilt per attempt: the window follows the clock.
                let args = |per_event| {
                    let ctx = CallContext {
                        namespace: NAMESPACE,
                        hours,
                        log_ttl: self.horizon.as_secs() + 3600,
                        // The idle call (no events) rebuilds it whole.
                        top: if events.is_empty() {
                            TopMode::Rebuild
                        } else {
                            TopMode::Keep
                        },
                        slot: None,
                        per_event,
                    };
                    script_args(&self.prefix, &ctx, events, now_us())
                };
                let key = format!("{}{NAMESPACE}:pos", self.prefix);
                run_batch_script(&self.client, &self.script, key, args)
                    .await
                    .map_err(|e| classify(&e, &self.url))
            })
            .await
            .map_err(|exhausted| exhausted.error)
    }

    /// Backfilled events: the ones the logs already hold are duplicates without a call; the
    /// script checks the others against what the logs gained since they were read.
    async fn call_backfill(&mut self, events: &[&EnrichedEvent]) -> Result<u64, SinkError> {
        let hours = horizon_hours(now_us(), self.horizon);
        let mut view = self.view.take().unwrap_or_default();
        let read = self.read_logs(&mut view, &hours).await;
        let result = match read {
            Ok(()) => {
                let fresh: Vec<&EnrichedEvent> = events
                    .iter()
                    .copied()
                    .filter(|e| !view.ids.contains(e.event_id))
                    .collect();
                let lengths: Vec<(String, u64, u64)> = hours
                    .iter()
                    .map(|h| {
                        let (ids, bf) = view.read.get(h).copied().unwrap_or((0, 0));
                        (h.clone(), ids, bf)
                    })
                    .collect();
                if fresh.is_empty() {
                    Ok(0)
                } else {
                    self.call(&fresh, &lengths).await
                }
            }
            Err(e) => Err(e),
        };
        self.view = Some(view);
        result
    }

    /// Read what the logs of `hours` gained since `view` last read them.
    async fn read_logs(&self, view: &mut LogView, hours: &[String]) -> Result<(), SinkError> {
        view.read.retain(|h, _| hours.contains(h));
        for h in hours {
            for bf in [false, true] {
                let kind = if bf { "bfids" } else { "ids" };
                let key = format!("{}{NAMESPACE}:{kind}:{h}", self.prefix);
                let from = view.read.get(h).map_or(0, |r| if bf { r.1 } else { r.0 });
                let what = || format!("reading {key}");
                let raw: Vec<u8> = self
                    .retry
                    .run("redis", &what, Some(&self.metrics), || async {
                        let v: Option<Vec<u8>> = self
                            .client
                            .getrange(&key, from as usize, 1usize << 40)
                            .await
                            .map_err(|e| classify(&e, &self.url))?;
                        Ok(v.unwrap_or_default())
                    })
                    .await
                    .map_err(|exhausted| exhausted.error)?;
                // Whole runs only: a log is appended 12 bytes a run, atomically.
                let whole = raw.len() - raw.len() % 12;
                view.ids.add_runs(&raw[..whole]);
                let r = view.read.entry(h.clone()).or_insert((0, 0));
                if bf {
                    r.1 = from + whole as u64;
                } else {
                    r.0 = from + whole as u64;
                }
            }
        }
        Ok(())
    }
}

/// Whether a Redis error is worth another attempt: transport failures, timeouts and a
/// server that is loading, busy or failing over are; a refused credential, a wrong key type
/// or a failing script (`ERR` replies) are not.
fn classify(e: &Error, url: &str) -> SinkError {
    let permanent_kind = matches!(
        e.kind(),
        ErrorKind::Auth
            | ErrorKind::Config
            | ErrorKind::InvalidCommand
            | ErrorKind::InvalidArgument
            | ErrorKind::Url
    );
    // A server's error reply starts with its code: ERR, WRONGTYPE, LOADING, BUSY, …
    let code = e.details().split_whitespace().next().unwrap_or("");
    if permanent_kind || code == "ERR" {
        SinkError::permanent(format!(
            "redis at {url} rejected the batch script: {e}; check that the keys the engine writes (see docs/sinks.md) are not used with other types"
        ))
    } else {
        SinkError::transient(format!("redis at {url}: {e}"))
    }
}

impl Sink for RedisSink {
    fn name(&self) -> &'static str {
        "redis"
    }

    /// While catching up, four batches a call: the script's work is per content, so larger
    /// calls cost Redis less per event. On a Redis Cluster eight: a write is split into a
    /// share per hash slot, each with its exactly-once state to read and write, so larger
    /// writes make fewer shares per event (the pipeline's budget grows with it).
    fn write_limit(&self, max_batch_rows: usize) -> usize {
        if self.cluster {
            8 * max_batch_rows
        } else {
            4 * max_batch_rows
        }
    }

    /// The script's work is mostly per content (a count, a bucket score, content:last):
    /// while catching up, a call waits up to this long to take in more batches, so each
    /// content's keys are written once for more of its events.
    fn fill_wait(&self) -> Duration {
        FILL_WAIT
    }

    fn deliver<'a>(
        &'a mut self,
        events: &'a [&'a EnrichedEvent],
    ) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(async move {
            let new = self.apply(events).await?;
            Ok(Delivery {
                new_events: Some(new),
                dead_lettered: 0,
            })
        })
    }

    fn idle(&mut self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            if self.last_rebuild.elapsed() >= IDLE_REBUILD {
                self.apply(&[]).await?;
                self.last_rebuild = Instant::now();
            }
            // The dashboard's copy catches up within seconds of the last batch.
            self.refresh_top().await;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrich::{enrich, RawEvent};
    use crate::types::Lsn;

    fn ev(id: i64, content: i64, ts_us: i64) -> EnrichedEvent {
        enrich(
            RawEvent {
                id,
                content_id: content,
                user_id: 1,
                event_type: "play".into(),
                event_ts_us: ts_us,
                duration_ms: Some(1000),
                device: None,
            },
            None,
            Lsn(1),
        )
        .0
    }

    #[test]
    fn minute_keys_and_sortable_timestamps() {
        assert_eq!(minute_key(1_767_882_112_000_000), "202601081421");
        assert_eq!(
            sortable_ts(1_767_882_112_000_000),
            "2026-01-08T14:21:52.000000Z"
        );
        assert!(sortable_ts(1_767_882_112_500_000) > sortable_ts(1_767_882_112_000_000));
    }

    fn text(v: &Value) -> String {
        v.as_str().map(|s| s.to_string()).unwrap_or_default()
    }

    proptest::proptest! {
        #[test]
        fn sortable_timestamps_are_the_broken_down_time_with_six_digits(
            us in -62_135_596_800_000_000i64 - 1_000_000_000_000..253_402_300_799_999_999
        ) {
            let p = utc_parts(us);
            let want = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
                p.year, p.month, p.day, p.hour, p.minute, p.second, p.micros
            );
            proptest::prop_assert_eq!(sortable_ts(us), want);
        }
    }

    /// The packed contents argument, as apply_batch.lua reads it: (content_id, index of the
    /// latest event, events, what the call does, event_ts, event_id).
    fn unpack_contents(b: &[u8]) -> Vec<(String, i32, i64, u8, String, String)> {
        let mut at = 0;
        let text = |b: &[u8], at: &mut usize| {
            let n = b[*at] as usize;
            let t = String::from_utf8(b[*at + 1..*at + 1 + n].to_vec()).unwrap();
            *at += 1 + n;
            t
        };
        let mut out = Vec::new();
        while at < b.len() {
            let id = text(b, &mut at);
            let latest = i32::from_be_bytes(b[at..at + 4].try_into().unwrap());
            let n = i64::from_be_bytes(b[at + 4..at + 12].try_into().unwrap());
            let does = b[at + 12];
            at += 13;
            let ts = text(b, &mut at);
            let event_id = text(b, &mut at);
            out.push((id, latest, n, does, ts, event_id));
        }
        out
    }

    #[test]
    fn arguments_aggregate_per_content_and_minute() {
        let now = 1_767_882_112_000_000; // 14:21:52
        let min = 60_000_000;
        let mut events = [
            ev(1, 7, now - 10 * min),  // 14:11, in retention
            ev(2, 8, now),             // 14:21
            ev(3, 7, now - 1_000_000), // 14:21, later than event 1
            ev(5, 7, now - 20 * min),  // 14:01, too old for a bucket
        ];
        for (k, e) in events.iter_mut().enumerate() {
            e.source_lsn = Lsn(0x1_0000_00ff);
            e.tx_index = k as u32;
        }
        let refs: Vec<&EnrichedEvent> = events.iter().collect();
        let hours = [("2026010814".to_string(), 0, 0)];
        let ctx = CallContext {
            namespace: "engagement_cdc",
            hours: &hours,
            log_ttl: 90_000,
            top: TopMode::Keep,
            slot: None,
            per_event: true,
        };
        let args = script_args("p:", &ctx, &refs, now);
        let a: Vec<String> = args.iter().map(text).collect();
        assert_eq!(&a[..3], ["p:", "engagement_cdc", "s"]);
        assert_eq!(a[3], "00000001000000ff00000000");
        assert_eq!(a[4], "00000001000000ff00000003");
        assert_eq!(a[5], "8000000000000001");
        assert_eq!(a[6], "8000000000000005");
        assert_eq!(&a[7..14], ["2026010814", "90000", "4", "2", "2", "3", "1"]);
        assert_eq!(&a[14..16], ["202601081411", "202601081421"]);
        assert_eq!(a[16], "202601081421"); // window starts at the current minute
        assert_eq!(a[25], "202601081412"); // and ends 9 minutes before

        // Per content, packed: content 7's latest event is event 3 (index 3), 3 events, its
        // count and content:last written here; content 8's is event 2, 1 event.
        let Value::Bytes(contents) = &args[26] else {
            panic!("contents")
        };
        assert_eq!(
            unpack_contents(contents),
            [
                (
                    "7".into(),
                    3,
                    3,
                    3,
                    "2026-01-08T14:21:51.000000Z".into(),
                    "3".into()
                ),
                (
                    "8".into(),
                    2,
                    1,
                    3,
                    "2026-01-08T14:21:52.000000Z".into(),
                    "2".into()
                ),
            ]
        );
        // (bucket, content, events): 14:11 × 7, 14:21 × 8, 14:21 × 7.
        let Value::Bytes(pairs) = &args[27] else {
            panic!("pairs")
        };
        let pairs: Vec<(i32, i32, i64)> = pairs
            .chunks(16)
            .map(|c| {
                (
                    i32::from_be_bytes(c[..4].try_into().unwrap()),
                    i32::from_be_bytes(c[4..8].try_into().unwrap()),
                    i64::from_be_bytes(c[8..].try_into().unwrap()),
                )
            })
            .collect();
        assert_eq!(pairs, [(1, 1, 1), (2, 2, 1), (2, 1, 1)]);
        // Each content's latest event's JSON.
        assert!(a[28].starts_with("{\"event_id\":3,"));
        assert!(a[29].starts_with("{\"event_id\":2,"));
        // Runs: 1..=3 and 5.
        let Value::Bytes(runs) = &args[30] else {
            panic!("runs")
        };
        let mut want = Vec::new();
        for (first, len) in [(1i64, 3u32), (5, 1)] {
            want.extend_from_slice(&first.to_be_bytes());
            want.extend_from_slice(&len.to_be_bytes());
        }
        assert_eq!(runs.to_vec(), want);
        let Value::Bytes(blob) = &args[31] else {
            panic!("blob")
        };
        let per_event: Vec<(i64, i32, i32, u32)> = blob
            .chunks(28)
            .map(|c| {
                (
                    i64::from_be_bytes(c[..8].try_into().unwrap()),
                    i32::from_be_bytes(c[8..12].try_into().unwrap()),
                    i32::from_be_bytes(c[12..16].try_into().unwrap()),
                    u32::from_be_bytes(c[24..].try_into().unwrap()),
                )
            })
            .collect();
        assert_eq!(
            per_event,
            [(1, 1, 1, 0), (2, 2, 2, 1), (3, 1, 2, 2), (5, 1, 0, 3)]
        );
        assert_eq!(&a[32..], ["1", "2026010814", "0", "0"]);
        assert_eq!(args.len(), 36);
        // Without the per-event part: the same arguments, that one empty.
        let lean_ctx = CallContext {
            per_event: false,
            ..ctx
        };
        let lean = script_args("p:", &lean_ctx, &refs, now);
        assert_eq!(lean.len(), args.len());
        for (k, (l, a)) in lean.iter().zip(&args).enumerate() {
            if k == 31 {
                assert_eq!(l, &Value::Bytes(Vec::new().into()));
            } else {
                assert_eq!(l, a, "argument {k}");
            }
        }
        // A backfill's call carries it whatever it asks.
        for e in events.iter_mut() {
            e.source_lsn = Lsn(0);
        }
        let refs: Vec<&EnrichedEvent> = events.iter().collect();
        let backfill = script_args("p:", &lean_ctx, &refs, now);
        let Value::Bytes(blob) = &backfill[31] else {
            panic!("blob")
        };
        assert_eq!(blob.len(), 4 * 28);
    }

    #[test]
    fn a_cluster_share_of_content_last_keys_only_goes_in_the_short_form() {
        let now = 1_767_882_112_000_000; // 14:21:52

        // Content 7's count and content:last keys hash to different slots.
        let last_slot = key_slot("p:content:last:7");
        let count_slot = key_slot("p:content:count:7");
        assert_ne!(last_slot, count_slot);
        let mut events = [ev(1, 7, now - 1_000_000), ev(3, 7, now), ev(2, 7, now)];
        for (k, e) in events.iter_mut().enumerate() {
            e.source_lsn = Lsn(0x1_0000_00ff);
            e.tx_index = k as u32;
        }
        let refs: Vec<&EnrichedEvent> = events.iter().collect();
        let share = |slot| {
            let ctx = CallContext {
                namespace: "engagement_cdc{x}",
                hours: &[],
                log_ttl: 90_000,
                top: TopMode::None,
                slot: Some(slot),
                per_event: false,
            };
            let args = script_args("p:", &ctx, &refs, now);
            args.iter().map(text).collect::<Vec<String>>()
        };
        // The slot of content:last: the content and its latest event (by event_ts, then
        // event_id: event 3), and the number of hours; no position, ids or counts.
        let a = share(last_slot);
        assert_eq!(&a[..4], ["p:", "engagement_cdc{x}", "l", "1"]);
        assert_eq!(&a[4..7], ["7", "2026-01-08T14:21:52.000000Z", "3"]);
        assert!(a[7].starts_with("{\"event_id\":3,"));
        assert_eq!(&a[8..], ["0"]);
        // The slot of its count: the long form, with positions.
        let a = share(count_slot);
        assert_eq!(&a[..3], ["p:", "engagement_cdc{x}", "s"]);
        assert_eq!(a[3], "00000001000000ff00000000");
    }

    #[test]
    fn positions_and_ids_sort_as_text_like_their_numbers() {
        let mut a = ev(-5, 1, 0);
        let mut b = ev(3, 1, 0);
        a.source_lsn = Lsn(0xff);
        a.tx_index = 9;
        b.source_lsn = Lsn(0x100);
        b.tx_index = 0;
        assert!(position(&a) < position(&b));
        let ids = [i64::MIN, -5, -1, 0, 1, 1 << 40, i64::MAX];
        for w in ids.windows(2) {
            assert!(hex_id(w[0]) < hex_id(w[1]), "{w:?}");
        }
    }

    #[test]
    fn id_ranges_merge_and_answer() {
        let events: Vec<EnrichedEvent> = [10, 11, 12, 20, 1_000_000_000_000, i64::MAX]
            .iter()
            .map(|id| ev(*id, 1, 0))
            .collect();
        let refs: Vec<&EnrichedEvent> = events.iter().collect();
        let mut r = IdRanges::default();
        r.add_runs(&id_runs(&refs));
        assert_eq!(r.len(), 4);
        for id in [10, 11, 12, 20, 1_000_000_000_000, i64::MAX] {
            assert!(r.contains(id), "{id}");
        }
        for id in [9, 13, 19, 21, 999_999_999_999, i64::MAX - 1, i64::MIN] {
            assert!(!r.contains(id), "{id}");
        }
        // 13..=19 joins the two first ranges into one.
        let fill: Vec<EnrichedEvent> = (13..20).map(|id| ev(id, 1, 0)).collect();
        r.add_runs(&id_runs(&fill.iter().collect::<Vec<_>>()));
        assert_eq!(r.len(), 3);
        assert!(r.contains(15) && r.contains(20) && !r.contains(21));
    }

    #[test]
    fn horizon_hours_cover_the_logs_still_kept() {
        let now = 1_767_882_112_000_000; // 2026-01-08 14:21:52
        let h = horizon_hours(now, Duration::from_secs(24 * 3600));
        assert_eq!(h.first().unwrap(), "2026010713");
        assert_eq!(h.last().unwrap(), "2026010815");
        assert_eq!(h.len(), 27);
    }
}
