
-- On a Redis Cluster, one call per node for several hash slots it serves (after
-- apply_batch.lua, which defines `apply`). Each group is what one slot's call would get,
-- without the hours of the dedup horizon, which the groups share (read in place):
--   ARGV[1] number of groups, ARGV[2] number of shared arguments, then those arguments,
--   then per group: its number of arguments, then its arguments.
-- A group touches only keys of its slot, its exactly-once state first: if the slot is no
-- longer here, the group fails before writing anything, and the groups applied before it
-- are skipped when the engine sends them again slot by slot.
-- Returns the sum of the groups' counts; when a group needs the per-event part its call
-- left out (see apply_batch.lua), -1 - the sum of the groups applied before it, which the
-- engine then sends again with that part (those groups are replays by then).
local groups, nshared = tonumber(ARGV[1]), tonumber(ARGV[2])
local at = 3 + nshared
local total = 0
for _ = 1, groups do
  local n = tonumber(ARGV[at])
  local A = {}
  for k = 1, n do A[k] = ARGV[at + k] end
  -- The shared arguments start with the number of hours.
  local got = apply(A, ARGV, 3)
  if got == nil then return -1 - total end
  total = total + got
  at = at + n + 1
end
return total
