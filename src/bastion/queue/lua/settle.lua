-- settle.lua: correct a job's buckets with its measured cost, and learn the model's cost per row.
--
-- The gateway reserved an estimate (rows x the model's cost per row); the worker measured the
-- inference time. The difference goes back into (or is taken from) each bucket that still
-- exists, never above its burst. The model's cost per row moves towards the measurement
-- (exponentially weighted, alpha 0.2).
--
-- KEYS[1] tenant bucket  KEYS[2] key bucket  KEYS[3] model cost hash cost:{model}
-- ARGV[1] reserved units  ARGV[2] measured units  ARGV[3] rows
local delta = tonumber(ARGV[1]) - tonumber(ARGV[2])
for i = 1, 2 do
  local s = redis.call('HMGET', KEYS[i], 'tokens', 'burst')
  if s[1] and s[2] then
    redis.call('HSET', KEYS[i], 'tokens', tostring(math.min(tonumber(s[2]), tonumber(s[1]) + delta)))
  end
end
local rows = tonumber(ARGV[3])
if rows > 0 then
  local measured = tonumber(ARGV[2]) / rows
  local old = tonumber(redis.call('HGET', KEYS[3], 'per_row') or tostring(measured))
  redis.call('HSET', KEYS[3], 'per_row', tostring(old * 0.8 + measured * 0.2))
  redis.call('EXPIRE', KEYS[3], 86400)
end
return 1
