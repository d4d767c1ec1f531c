-- replay.lua: put a dead-lettered async job back on its model's batch lane.
--
-- Guarantees: the job's stored outcome ('dead_lettered') is cleared and the job is queued again
-- in one step, with its original envelope (a fresh entry: delivery count 0), and the dead letter
-- is removed, so a replay never runs a job twice or loses it. The replay was not admitted, so it
-- carries no reservation and no in-flight slot: the worker refunds nothing for it. A sync job's
-- caller got its answer long ago, and a shadow copy answers nobody: their dead letters are only
-- removed, as is an evaluation's (its report was closed when the job died) and a malformed one.
--
-- A letter marked replayable '0' kept no copy of its input (it was too large): it cannot run
-- again, and it is left where it is (listed, until it ages out or is trimmed).
--
-- Only async jobs are replayed, and they were on the batch lane already: the envelope is copied as is.
-- KEYS[1] dead-letter stream dlq:{model}  KEYS[2] batch stream q:{model}:batch
-- ARGV[1] dead-letter entry id  ARGV[2] job state TTL s  ARGV[3] job key prefix ('job:')
-- Returns 1 replayed, 2 discarded (sync or shadow), 3 not replayable (kept), 0 not found.
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then
  return 0
end
local raw = found[1][2]
for i = 1, #raw, 2 do
  if raw[i] == 'replayable' and raw[i + 1] == '0' then
    return 3
  end
end
local fields, seen = {}, {}
for i = 1, #raw, 2 do
  local k, v = raw[i], raw[i + 1]
  seen[k] = v
  if k ~= 'reason' and k ~= 'entry' and k ~= 'c' and k ~= 'q' then
    fields[#fields + 1] = k
    fields[#fields + 1] = v
  end
end
redis.call('XDEL', KEYS[1], ARGV[1])
local job_id, tenant, model, version, reply
if seen['v'] then  -- envelope version 2: the members are a JSON object in 'm'
  local ok, m = pcall(cjson.decode, seen['m'] or '')
  if not ok or type(m) ~= 'table' or m['role'] == 'shadow' or m['role'] == 'evaluation' then
    return 2  -- a shadow answers nobody; an evaluation's report was closed when it died
  end
  if type(m['version']) ~= 'number' or m['version'] < 1 or m['version'] > 1e9 then
    return 2
  end
  job_id, tenant, model, reply = m['id'], m['tenant'], m['model'], m['reply'] or ''
  version = string.format('%d', m['version'])
elseif seen['h'] then  -- envelope version 1: 'id|tenant|model|version|deadline|reply|created'
  local parts = {}
  for part in string.gmatch(seen['h'] .. '|', '([^|]*)|') do
    parts[#parts + 1] = part
  end
  job_id, tenant, model, version, reply = parts[1], parts[2], parts[3], parts[4], parts[6]
  if seen['p'] or seen['e'] or not string.match(version or '', '^%d+$') then
    return 2
  end
end
if type(job_id) ~= 'string' or job_id == '' or reply ~= '' or type(tenant) ~= 'string' or type(model) ~= 'string' then
  return 2
end
local job = ARGV[3] .. job_id
redis.call('HDEL', job, 'final', 'result', 'error', 'finished', 'started', 'worker', 'pid')
redis.call('HSET', job, 'status', 'queued', 'tenant', tenant, 'model', model, 'version', version or '')
redis.call('EXPIRE', job, tonumber(ARGV[2]))
redis.call('XADD', KEYS[2], '*', unpack(fields))
return 1
