-- start.lua: mark an async job running unless it already has an outcome.
--
-- Guarantees: a finished job's status is never moved back to 'running' by a redelivery.
-- A state that expired is never recreated (it would live without a TTL).
-- KEYS[1] job state hash   ARGV[1] worker name   ARGV[2] started (ms; '' when only the pid
-- changes: a child process took the job over)   ARGV[3] pid running it
-- ARGV[4] job events channel: ARGV[5] (the job id) is published there when it starts ('' : not announced)
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('HEXISTS', KEYS[1], 'final') == 0 then
  if ARGV[2] == '' then
    redis.call('HSET', KEYS[1], 'pid', ARGV[3])
  else
    redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started', ARGV[2], 'pid', ARGV[3])
    if ARGV[4] ~= '' then
      redis.call('PUBLISH', ARGV[4], ARGV[5])
    end
  end
  return 1
end
return 0
