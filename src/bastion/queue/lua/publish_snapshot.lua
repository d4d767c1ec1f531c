-- publish_snapshot.lua: store a control-plane snapshot only if it is newer, and announce it.
--
-- Guarantees: the stored snapshot's serial never goes down. Publishers that read the state
-- earlier hold lower serials (the registry issues them in SQL), so a slow publish can never
-- overwrite a newer snapshot - a revoked key stays revoked, a kill switch stays on. The check,
-- the write of the snapshot, the write of its serial to the small key readers poll, and the
-- notice are one atomic step: snap:serial names the serial of snap:current whenever this
-- script wrote both (a refused publish writes the serial key only if it is missing, e.g. on a
-- Redis written by an older release).
--
-- The serial is read from the stored JSON's first field ('{"serial":123,...', written so by
-- bastion.snapshot.encode); a stored snapshot without it (an older release's) counts as older.
-- Serials are compared as decimal strings (by length, then by digits): Lua numbers are doubles,
-- too coarse for serials near 2^61.
--
-- KEYS[1] snap:current   KEYS[2] snap:serial
-- ARGV[1] serial (decimal, no leading zeros)   ARGV[2] snapshot JSON   ARGV[3] the notice channel (snap:notify)
-- Returns {serial now stored, 1 if this call wrote it else 0}.
local head = redis.call('GETRANGE', KEYS[1], 0, 40)
local stored = string.match(head, '^{"serial":(%d+)')
local new = ARGV[1]
if stored then
  if #stored > #new or (#stored == #new and stored >= new) then
    if redis.call('EXISTS', KEYS[2]) == 0 then
      redis.call('SET', KEYS[2], stored)
    end
    return {stored, 0}
  end
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], new)
redis.call('PUBLISH', ARGV[3], new)
return {new, 1}
