-- enqueue.lua: backpressure check + job state + XADD, atomically.
--
-- Guarantees: a job is either refused (queue over its limit) or appended to the model's
-- stream together with its state hash (async jobs), never one without the other. No other
-- client can observe the queue between the length check and the append.
--
-- KEYS[1] queue stream q:{model}:{lane}
-- KEYS[2] job state hash job:{id}
-- ARGV[1] queue length limit
-- ARGV[2] '1' to create the job state hash (async), '0' for sync jobs
-- ARGV[3] job state TTL in seconds
-- ARGV[4] tenant   ARGV[5] model   ARGV[6] created (ms since epoch)
-- ARGV[7..] stream entry field/value pairs
-- Returns {1, entry-id} when queued, {0, queue-length} when refused.
local len = redis.call('XLEN', KEYS[1])
if len >= tonumber(ARGV[1]) then
  return {0, len}
end
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[2], 'tenant', ARGV[4], 'model', ARGV[5], 'status', 'queued', 'created', ARGV[6])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 7))
return {1, id}
