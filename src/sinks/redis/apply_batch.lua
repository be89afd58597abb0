-- engagement-cdc: apply one batch of enriched events to Redis, exactly once per event.
-- Run with EVALSHA; every effect below happens atomically, and running the same batch
-- again (a replay after a crash, a client re-send after a reconnect) changes nothing.
--
-- ARGV (built by src/sinks/redis/mod.rs):
--   1 key prefix   2 number of events   3 number of contents   4 number of minute buckets
--   then one YYYYMMDDHHMM per bucket
--   then the 10 minutes of the top:content:10m window (YYYYMMDDHHMM)
--   then per content: content_id, index of its latest event in this batch,
--                     that event's event_ts (RFC 3339, always 6 fraction digits),
--                     its event_id, its JSON
--   then, last, one binary string with per event: event_id (8 bytes), content index
--   (1-based, 4 bytes), bucket index (0 = outside retention, 4 bytes), big-endian
-- Returns the number of events new to Redis.
local p = ARGV[1]
local ne, nc, nb = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local i = 5
local buckets = {}
for b = 1, nb do
  buckets[b] = ARGV[i]
  i = i + 1
end
local window = {}
for w = 1, 10 do
  window[w] = p .. 'top:content:bucket:' .. ARGV[i]
  i = i + 1
end
local cbase = i
i = i + 5 * nc

-- Dedup: one bit per event id, in bitmaps of 2^20 ids, kept without expiry. The bits of a
-- bitmap are set with one BITFIELD per 1000 ids, which answers each bit's old value.
local CHUNK = 1048576
local ev_content, ev_bucket = {}, {}
local groups, order = {}, {}
local blob = ARGV[i]
local pos = 1
for e = 1, ne do
  local id, c, b
  id, c, b, pos = struct.unpack('>i8i4i4', blob, pos)
  ev_content[e] = c
  ev_bucket[e] = b
  local chunk = math.floor(id / CHUNK)
  local g = groups[chunk]
  if not g then
    g = { n = 0, off = {}, idx = {} }
    groups[chunk] = g
    order[#order + 1] = chunk
  end
  g.n = g.n + 1
  g.off[g.n] = id - chunk * CHUNK
  g.idx[g.n] = e
end

local per_content = {}
local per_bucket = {}
local is_new = {}
local inserted = 0
for _, chunk in ipairs(order) do
  local g = groups[chunk]
  local key = p .. 'engagement_cdc:seen:' .. chunk
  local s = 1
  while s <= g.n do
    local t = math.min(g.n, s + 999)
    local args = {}
    for k = s, t do
      args[#args + 1] = 'SET'
      args[#args + 1] = 'u1'
      args[#args + 1] = g.off[k]
      args[#args + 1] = 1
    end
    local old = redis.call('BITFIELD', key, unpack(args))
    for k = s, t do
      if old[k - s + 1] == 0 then
        local e = g.idx[k]
        local c, b = ev_content[e], ev_bucket[e]
        inserted = inserted + 1
        is_new[e] = true
        per_content[c] = (per_content[c] or 0) + 1
        if b > 0 then
          local bt = per_bucket[b]
          if not bt then
            bt = {}
            per_bucket[b] = bt
          end
          bt[c] = (bt[c] or 0) + 1
        end
      end
    end
    s = t + 1
  end
end

-- Per content: one INCRBY, and content:last when its latest event is new and later than
-- the stored one by (event_ts, event_id).
for c = 1, nc do
  local base = cbase + 5 * (c - 1)
  local n = per_content[c]
  if n then
    local cid = ARGV[base]
    redis.call('INCRBY', p .. 'content:count:' .. cid, n)
    if is_new[tonumber(ARGV[base + 1])] then
      local key = p .. 'content:last:' .. cid
      local cur = redis.call('GET', key)
      local later = true
      if cur then
        local cts = string.match(cur, '"event_ts":"([^"]*)"')
        local cur_id = tonumber(string.match(cur, '^{"event_id":(%-?%d+)'))
        if cts and cur_id then
          if not string.find(cts, '.', 1, true) then
            cts = string.sub(cts, 1, -2) .. '.000000Z'
          end
          local ts = ARGV[base + 2]
          later = (ts > cts) or (ts == cts and tonumber(ARGV[base + 3]) > cur_id)
        end
      end
      if later then
        redis.call('SET', key, ARGV[base + 4], 'EX', 3600)
      end
    end
  end
end

-- Per minute bucket and content: one ZINCRBY; the bucket's TTL refreshed.
for b, t in pairs(per_bucket) do
  local key = p .. 'top:content:bucket:' .. buckets[b]
  for c, n in pairs(t) do
    redis.call('ZINCRBY', key, n, ARGV[cbase + 5 * (c - 1)])
  end
  redis.call('EXPIRE', key, 900)
end

-- The last 10 minutes, rebuilt from the buckets.
redis.call('ZUNIONSTORE', p .. 'top:content:10m', 10, unpack(window))
redis.call('EXPIRE', p .. 'top:content:10m', 120)
return inserted
