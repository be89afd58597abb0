-- engagement-cdc: apply one batch of enriched events to Redis, exactly once per event.
-- Run with EVALSHA; every effect below happens atomically, and running the same batch
-- again (a replay after a crash, a client re-send after a reconnect, a failover that lost
-- the last writes) changes nothing. docs/sinks.md, "Redis", explains the state it keeps.
--
-- Exactly-once state, under the namespace NS (`engagement_cdc`, or `engagement_cdc{tag}` so
-- that it shares the hash slot of the keys it guards on a Redis Cluster):
--   NS:pos          the stream position (commit LSN, index in the transaction, 24 hex
--                   digits) of the last streamed event applied here; streamed events at or
--                   before it are replays. Never expires; one key.
--   NS:ids:HOUR     the event ids the stream applied in that hour (UTC, of the apply),
--                   as runs of consecutive ids: 8-byte big-endian first id, 4-byte length.
--   NS:bfids:HOUR   the same for events a backfill applied. (A call that writes only
--                   content:last keys, as a Redis Cluster slot's may, reads and writes
--                   none of this state.)
--   NS:bf           the lowest and highest id in the bfids logs (16 hex digits each, the
--                   sign bit flipped so that they sort), so a streamed batch outside that
--                   range skips the per-event check.
--   The logs expire after the dedup horizon; a backfill checks them (the engine reads them
--   first, this script the part written since).
--
-- Arguments (a call's ARGV; built by src/sinks/redis/mod.rs, `script_args`):
--   1 key prefix   2 NS   3 mode: 's' streamed events (with positions), 'b' backfilled ones,
--     'l' the short form of a Redis Cluster slot's share that writes only content:last keys:
--     then 4 the number of contents, and per content: content_id, its latest event's
--     event_ts (as below), event_id and JSON; nothing else is read
--   4 position of the first event, 5 of the last (stream), '' for a backfill
--   6 lowest id, 7 highest id of the call (16 hex digits, sign bit flipped)
--   8 apply hour (YYYYMMDDHH)   9 TTL of the logs (seconds)
--   10 number of events   11 of contents   12 of minute buckets   13 of (bucket, content)
--   14 top:content:10m: '1' keep it here (add the call's new events of the window's
--      minutes to it; ZUNIONSTORE of the window when its minute changed or the key is
--      missing), '2' rebuild it with ZUNIONSTORE, '0' not here (a Redis Cluster builds it
--      apart)
--   then one YYYYMMDDHHMM per bucket
--   then, when 14 is not '0', the 10 minutes of the top:content:10m window, the
--      current one first
--   then the contents, packed in one argument, per content (big-endian, texts preceded
--                     by their length in a byte, as struct's 'Bc0' reads them):
--                     content_id (text), index of its latest event in this call (4 bytes),
--                     the number of the call's events of that content (8), what this call
--                     does for it (1 byte: bit 1 its count, bit 2 its content:last; on a
--                     Redis Cluster each key is written by the call of its slot), that
--                     event's event_ts (text, RFC 3339, 6 fraction digits) and its event_id
--                     (text), both empty without content:last
--   then the (bucket, content) pairs, packed in one argument: bucket index (4 bytes),
--                     content index (4), number of events (8)
--   then per content: the JSON of its latest event ('' without content:last)
--   then the runs of the call's ids (12 bytes each, as in the logs)
--   then per event: id (8 bytes), content index (4), bucket index (4, 0 = outside
--                   retention), commit LSN (8), index in transaction (4), big-endian;
--                   a streamed call may leave this empty (most of what it would send,
--                   and unused in the common case): when the script must decide event by
--                   event it then returns nil before writing anything, and the engine
--                   calls again with it
--   then the number of hours of the dedup horizon, and per hour: HOUR, and (backfill) the
--                   lengths of its ids log and of its bfids log the engine has read
-- KEYS[1] is NS:pos (it routes the call to its node on a Redis Cluster).
-- Returns the number of events new to Redis (on a cluster: whose count this call keeps),
-- or nil when it needs the per-event part that was left out.
--
-- This file defines `apply(A, H, h)`, A being the arguments above; the script sent is this
-- file followed by `return apply(ARGV)` (one Redis), or by apply_groups.lua (one call for
-- several hash slots of one Redis Cluster node), whose groups share the hours: they are
-- read from H at index h (the number of hours) instead of from A.
-- content:last at `key` set to `json` when the event (`ts`, `id`) is later than the stored
-- one by (event_ts, event_id); applying an event again leaves it as it was.
local function write_last(key, ts, id, json)
  local cur = redis.call('GET', key)
  local later = true
  if cur then
    local cts = string.match(cur, '"event_ts":"([^"]*)"')
    local cur_id = tonumber(string.match(cur, '^{"event_id":(%-?%d+)'))
    if cts and cur_id then
      if not string.find(cts, '.', 1, true) then
        cts = string.sub(cts, 1, -2) .. '.000000Z'
      end
      later = (ts > cts) or (ts == cts and tonumber(id) > cur_id)
    end
  end
  if later then
    redis.call('SET', key, json, 'EX', 3600)
  end
end

local function apply(A, H, h)
  local p, ns, mode = A[1], A[2], A[3]
  if mode == 'l' then
    -- The short form: content:last keys only, no exactly-once state to read or write.
    for c = 1, tonumber(A[4]) do
      local at = 5 + 4 * (c - 1)
      write_last(p .. 'content:last:' .. A[at], A[at + 1], A[at + 2], A[at + 3])
    end
    return 0
  end
  local first, last = A[4], A[5]
  local call_lo, call_hi = A[6], A[7]
  local hour, ttl = A[8], tonumber(A[9])
  local ne, nc, nb, np = tonumber(A[10]), tonumber(A[11]), tonumber(A[12]), tonumber(A[13])
  local top_mode = A[14]
  local i = 15
  local buckets = {}
  for b = 1, nb do
    buckets[b] = A[i]
    i = i + 1
  end
  local window, in_window, window_minute = {}, {}, nil
  if top_mode ~= '0' then
    window_minute = A[i]
    for w = 1, 10 do
      window[w] = p .. 'top:content:bucket:' .. A[i]
      in_window[A[i]] = true
      i = i + 1
    end
  end
  local contents_blob, pairs_blob = A[i], A[i + 1]
  local jbase = i + 2
  i = jbase + nc
  local runs_blob = A[i]
  local ev_blob = A[i + 1]
  if not H then H, h = A, i + 2 end

  -- Per content: its id, its latest event's index, event_ts and event_id, its number of
  -- events, what the call does for it (counts[c], lasts[c]); its JSON is A[jbase + c - 1].
  local cid, clatest, cts, cevid, cnum = {}, {}, {}, {}, {}
  local counts, lasts = {}, {}
  local at = 1
  for c = 1, nc do
    local does
    cid[c], clatest[c], cnum[c], does, cts[c], cevid[c], at =
      struct.unpack('>Bc0i4i8BBc0Bc0', contents_blob, at)
    counts[c] = does % 2 == 1
    lasts[c] = does >= 2
  end
  -- Per (bucket, content): bucket index, content index, number of events.
  local pb, pc, pn = {}, {}, {}
  at = 1
  for k = 1, np do
    pb[k], pc[k], pn[k], at = struct.unpack('>i4i4i8', pairs_blob, at)
  end

  -- The hours of the dedup horizon: { HOUR, ids read, bfids read }, read only by the
  -- calls that check ids (not by the common case).
  local function read_hours()
    local hours, at = {}, h
    for _ = 1, tonumber(H[at]) do
      hours[#hours + 1] = { H[at + 1], tonumber(H[at + 2]), tonumber(H[at + 3]) }
      at = at + 3
    end
    return hours
  end

  -- top:content:10m equal to the union of the window's buckets after the call: rebuilt
  -- when the window moved (NS:top holds the minute it was built for), the key is missing
  -- or the engine asks; otherwise the call's new events of the window's minutes (adds:
  -- { bucket index, content_id, number }) are added to it as they were to their buckets.
  -- A call that adds to many contents (a catch-up) rebuilds it too when the window holds
  -- not many more members than it adds: one union then costs Redis less than an increment
  -- (a command, and its propagation) for each.
  local function top(adds)
    if top_mode == '0' then return end
    local key, mark = p .. 'top:content:10m', p .. ns .. ':top'
    local rebuild = top_mode == '2' or redis.call('GET', mark) ~= window_minute
        or redis.call('EXISTS', key) == 0
    if not rebuild and #adds > 64 then
      local members = 0
      for w = 1, 10 do members = members + redis.call('ZCARD', window[w]) end
      rebuild = members <= 4 * #adds
    end
    if rebuild then
      redis.call('ZUNIONSTORE', key, 10, unpack(window))
      redis.call('SET', mark, window_minute, 'EX', 120)
    else
      for _, a in ipairs(adds) do
        if in_window[buckets[a[1]]] then
          redis.call('ZINCRBY', key, a[3], a[2])
        end
      end
    end
    redis.call('EXPIRE', key, 120)
  end

  -- An 8-byte big-endian id as 16 hex digits with the sign bit flipped: sorts as the id.
  local function hex_id(raw, at)
    local hi, lo = struct.unpack('>I4I4', raw, at)
    hi = (hi + 2147483648) % 4294967296
    return string.format('%08x%08x', hi, lo)
  end

  -- The last id of a run (first id + length - 1) in the same form, exactly.
  local function hex_end(raw, at, len)
    local hi, lo = struct.unpack('>I4I4', raw, at)
    hi = (hi + 2147483648) % 4294967296
    lo = lo + len - 1
    if lo >= 4294967296 then
      lo = lo - 4294967296
      hi = (hi + 1) % 4294967296
    end
    return string.format('%08x%08x', hi, lo)
  end

  -- Runs of a log (or a part of it), sorted: { {first, last}, ... } in hex form.
  local function read_runs(list, raw)
    for at = 1, #raw - 11, 12 do
      local len = struct.unpack('>I4', raw, at + 8)
      list[#list + 1] = { hex_id(raw, at), hex_end(raw, at, len) }
    end
  end

  -- Sorted by first id, each run also carrying the highest last id up to it.
  local function sorted(list)
    table.sort(list, function(a, b) return a[1] < b[1] end)
    local m = nil
    for _, r in ipairs(list) do
      if not m or r[2] > m then m = r[2] end
      r[3] = m
    end
    return list
  end

  -- Whether hex id h is in the sorted runs: some run starting at or before h ends at or
  -- after it.
  local function in_runs(list, h)
    local lo, hi = 1, #list
    while lo <= hi do
      local mid = math.floor((lo + hi) / 2)
      if list[mid][1] <= h then lo = mid + 1 else hi = mid - 1 end
    end
    return hi >= 1 and list[hi][3] >= h
  end

  -- Dedup bitmaps of versions before the logs (`engagement_cdc:seen:{id / 2^20}`): read,
  -- never written, so an upgrade does not apply again what the old version applied. Those
  -- versions refused a Redis Cluster, so there (NS with a hash tag) there are none.
  local legacy_chunks = {}
  local function legacy_seen(id)
    if ns ~= 'engagement_cdc' then return false end
    local chunk = math.floor(id / 1048576)
    local key = p .. 'engagement_cdc:seen:' .. chunk
    local exists = legacy_chunks[chunk]
    if exists == nil then
      exists = redis.call('EXISTS', key) == 1
      legacy_chunks[chunk] = exists
    end
    return exists and redis.call('GETBIT', key, id - chunk * 1048576) == 1
  end

  -- Whether the ids must be logged: a count or a bucket applied twice would count twice;
  -- content:last alone keeps the later event by (event_ts, event_id), so applying an event
  -- again changes nothing (a Redis Cluster slot's share that writes nothing else comes in
  -- the short form, above).
  local logs = np > 0
  for c = 1, nc do
    if counts[c] then logs = true end
  end

  local function add_effects_fast()
    local n = 0
    for c = 1, nc do
      if counts[c] then
        redis.call('INCRBY', p .. 'content:count:' .. cid[c], cnum[c])
        n = n + cnum[c]
      end
    end
    for k = 1, np do
      redis.call('ZINCRBY', p .. 'top:content:bucket:' .. buckets[pb[k]], pn[k], cid[pc[k]])
    end
    return n
  end

  -- content:last, for each content whose latest event of the call is new: set when that
  -- event is later than the stored one by (event_ts, event_id).
  local function set_last(c)
    write_last(p .. 'content:last:' .. cid[c], cts[c], cevid[c], A[jbase + c - 1])
  end

  local function expire_buckets(used)
    for b = 1, nb do
      if used[b] then
        redis.call('EXPIRE', p .. 'top:content:bucket:' .. buckets[b], 900)
      end
    end
  end

  -- Append to a log; its TTL is set by the hour's first append (the log of an hour is
  -- written within that hour, so it is kept at least TTL - 1 h after its last append).
  local function append(key, blob)
    if #blob > 0 and redis.call('APPEND', key, blob) == #blob then
      redis.call('EXPIRE', key, ttl)
    end
  end

  -- A call without counts or buckets (one Redis's idle call, which only rebuilds
  -- top:content:10m): no exactly-once state to read or write.
  if not logs then
    for c = 1, nc do
      if lasts[c] then set_last(c) end
    end
    top({})
    return 0
  end

  local pos_key = p .. ns .. ':pos'
  -- The position and the backfilled range, in one command.
  local state = redis.call('MGET', pos_key, p .. ns .. ':bf')
  local w = false
  if mode == 's' then
    w = state[1]
    if w and last <= w then
      -- Every event is a replay.
      top({})
      return 0
    end
  end

  -- Whether the call's ids meet the range of backfilled ids.
  local bf_runs = nil
  local bf = state[2]
  if bf then
    local lo, hi = string.match(bf, '^(%x+):(%x+)$')
    if lo and not (call_hi < lo or call_lo > hi) then
      bf_runs = {}
    end
  end

  if mode == 's' and w and first > w and not bf_runs then
    -- The common case: every event is after the watermark and none was backfilled.
    local n = add_effects_fast()
    for c = 1, nc do
      if lasts[c] then set_last(c) end
    end
    local used, adds = {}, {}
    for k = 1, np do
      used[pb[k]] = true
      adds[k] = { pb[k], cid[pc[k]], pn[k] }
    end
    expire_buckets(used)
    if logs then append(p .. ns .. ':ids:' .. hour, runs_blob) end
    redis.call('SET', pos_key, last)
    top(adds)
    return n
  end
  if ne > 0 and #ev_blob == 0 then
    -- Left out by the engine: nothing was written; it calls again with it.
    return nil
  end

  -- Event by event: a replay that crosses the watermark, a first call (no watermark: checks
  -- the bitmaps of older versions), a batch whose ids may have been backfilled, a backfill.
  local check_runs = {}
  local hours = read_hours()
  if bf_runs then
    local list = {}
    for _, h in ipairs(hours) do
      local raw = redis.call('GET', p .. ns .. ':bfids:' .. h[1])
      if raw then read_runs(list, raw) end
    end
    bf_runs = sorted(list)
  end
  if mode == 'b' then
    -- What the logs gained since the engine read them.
    for _, h in ipairs(hours) do
      for _, part in ipairs({ { ':ids:', h[2] }, { ':bfids:', h[3] } }) do
        local key = p .. ns .. part[1] .. h[1]
        if redis.call('STRLEN', key) > part[2] then
          read_runs(check_runs, redis.call('GETRANGE', key, part[2], -1))
        end
      end
    end
    check_runs = sorted(check_runs)
  end

  local per_content, per_bucket, is_new, new_ids = {}, {}, {}, {}
  local inserted = 0
  local at = 1
  for e = 1, ne do
    local raw = string.sub(ev_blob, at, at + 7)
    local id, c, b, lh, ll, ord = struct.unpack('>i8i4i4I4I4I4', ev_blob, at)
    at = at + 28
    local h = hex_id(raw, 1)
    local new
    if mode == 's' then
      new = not w or string.format('%08x%08x%08x', lh, ll, ord) > w
      if new and bf_runs then new = not in_runs(bf_runs, h) end
      if new and not w then new = not legacy_seen(id) end
    else
      new = not in_runs(check_runs, h) and not legacy_seen(id)
    end
    if new then
      if counts[c] then inserted = inserted + 1 end
      is_new[e] = true
      new_ids[#new_ids + 1] = raw .. '\0\0\0\1'
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

  for c = 1, nc do
    local n = per_content[c]
    if n then
      if counts[c] then
        redis.call('INCRBY', p .. 'content:count:' .. cid[c], n)
      end
      if lasts[c] and is_new[clatest[c]] then
        set_last(c)
      end
    end
  end
  local used, adds = {}, {}
  for b, t in pairs(per_bucket) do
    local key = p .. 'top:content:bucket:' .. buckets[b]
    for c, n in pairs(t) do
      local content_id = cid[c]
      redis.call('ZINCRBY', key, n, content_id)
      adds[#adds + 1] = { b, content_id, n }
    end
    used[b] = true
  end
  expire_buckets(used)
  local blob = table.concat(new_ids)
  if mode == 's' then
    if logs then append(p .. ns .. ':ids:' .. hour, blob) end
    if ne > 0 and (not w or last > w) then
      redis.call('SET', pos_key, last)
    end
  elseif logs and #new_ids > 0 then
    append(p .. ns .. ':bfids:' .. hour, blob)
    -- Widen the backfilled range to the new ids.
    local lo, hi = call_lo, call_hi
    if bf then
      local blo, bhi = string.match(bf, '^(%x+):(%x+)$')
      if blo then
        if blo < lo then lo = blo end
        if bhi > hi then hi = bhi end
      end
    end
    redis.call('SET', p .. ns .. ':bf', lo .. ':' .. hi, 'EX', ttl)
  end
  top(adds)
  return inserted
end
