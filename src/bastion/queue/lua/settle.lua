-- settle.lua: correct a group of jobs' buckets with their measured cost, and learn the version's
-- cost per row.
--
-- The gateway reserved an estimate (rows x the version's cost per row); the worker measured the
-- inference time. The difference goes back into (or is taken from) each bucket that still
-- exists, never above its burst; jobs that reserved nothing (a replayed dead letter) are not in
-- these sums. The price learns only from jobs that ran (a job that expired before running
-- measured nothing and teaches nothing): it moves towards their measured units per row
-- (exponentially weighted, alpha 0.2), never below the floor.
--
-- A text job's unused tokens go back the same way (``calls.settle_tokens``): KEYS[1], KEYS[2]
-- are then its token buckets, ARGV[1] the tokens reserved, ARGV[2] those used (never more than
-- reserved: nothing is taken), ARGV[4] 0 (no price is learned; KEYS[3] unused).
--
-- KEYS[1] tenant bucket  KEYS[2] key bucket  KEYS[3] version cost hash cost:{model}:{version}
-- ARGV[1] reserved units  ARGV[2] measured units of the jobs that reserved
-- ARGV[3] measured units of the jobs that ran  ARGV[4] rows of the jobs that ran (0: learn nothing)
-- ARGV[5] lowest cost per row
local delta = tonumber(ARGV[1]) - tonumber(ARGV[2])
if delta ~= 0 then
  for i = 1, 2 do
    local s = redis.call('HMGET', KEYS[i], 'tokens', 'burst')
    if s[1] and s[2] then
      redis.call('HSET', KEYS[i], 'tokens', tostring(math.min(tonumber(s[2]), tonumber(s[1]) + delta)))
    end
  end
end
local rows = tonumber(ARGV[4])
if rows > 0 then
  local measured = tonumber(ARGV[3]) / rows
  local old = tonumber(redis.call('HGET', KEYS[3], 'per_row') or tostring(measured))
  redis.call('HSET', KEYS[3], 'per_row', tostring(math.max(tonumber(ARGV[5]), old * 0.8 + measured * 0.2)))
  redis.call('EXPIRE', KEYS[3], 86400)
end
return 1
