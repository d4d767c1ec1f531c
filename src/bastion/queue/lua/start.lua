-- start.lua: mark an async job running unless it already has an outcome.
--
-- Guarantees: a finished job's status is never moved back to 'running' by a redelivery.
-- KEYS[1] job state hash   ARGV[1] worker name   ARGV[2] started (ms)
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('HEXISTS', KEYS[1], 'final') == 0 then
  redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started', ARGV[2])
  redis.call('HDEL', KEYS[1], 'pid')  -- a child process of an earlier run is gone
  return 1
end
return 0
