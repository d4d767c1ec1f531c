-- replay.lua: put a dead-lettered async job back on its model's batch lane.
--
-- Guarantees: the job's stored outcome ('dead_lettered') is cleared and the job is queued again
-- in one step, with its original fields (a fresh entry: delivery count 0), and the dead letter is
-- removed, so a replay never runs a job twice or loses it. A sync job's caller got its answer
-- long ago: its dead letter is only removed.
--
-- KEYS[1] dead-letter stream dlq:{model}  KEYS[2] batch stream q:{model}:batch
-- ARGV[1] dead-letter entry id  ARGV[2] job state TTL s  ARGV[3] job key prefix ('job:')
-- Returns 1 replayed, 2 discarded (sync), 0 not found.
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then
  return 0
end
local raw = found[1][2]
local fields, header = {}, nil
for i = 1, #raw, 2 do
  local k, v = raw[i], raw[i + 1]
  if k == 'h' then header = v end
  if k ~= 'reason' and k ~= 'entry' and k ~= 'q' then  -- 'q' was released when it died
    fields[#fields + 1] = k
    fields[#fields + 1] = v
  end
end
redis.call('XDEL', KEYS[1], ARGV[1])
if header == nil then
  return 2
end
local parts = {}
for part in string.gmatch(header .. '|', '([^|]*)|') do
  parts[#parts + 1] = part
end
if parts[6] ~= '' then
  return 2
end
local job = ARGV[3] .. parts[1]
redis.call('HDEL', job, 'final', 'result', 'error', 'finished')
redis.call('HSET', job, 'status', 'queued', 'tenant', parts[2], 'model', parts[3])
redis.call('EXPIRE', job, tonumber(ARGV[2]))
redis.call('XADD', KEYS[2], '*', unpack(fields))
return 1
