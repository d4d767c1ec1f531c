-- prune.lua: remove consumers of a group that hold nothing and have been idle long.
--
-- Workers that died (a new process gets a new name) leave their consumer behind. One with
-- pending entries must stay until those are reclaimed; one with none and no activity for the
-- given time is deleted. Checked and deleted in one step, so a consumer that reads between
-- the check and the delete cannot lose the entries it just took.
--
-- KEYS[1] stream   ARGV[1] group   ARGV[2] minimum idle (ms)   ARGV[3] a consumer to keep
-- Returns the number of consumers removed.
local removed = 0
local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
for _, c in ipairs(consumers) do
  local name, pending, idle
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1]
    elseif c[i] == 'pending' then pending = c[i + 1]
    elseif c[i] == 'idle' then idle = c[i + 1] end
  end
  if name ~= ARGV[3] and pending == 0 and idle >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    removed = removed + 1
  end
end
return removed
