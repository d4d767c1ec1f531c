-- complete.lua: record a job's outcome exactly once, reply, acknowledge.
--
-- Guarantees: the first outcome written for a job id wins (HSETNX on 'final'); a redelivered
-- job that finishes again replies with the stored outcome, so a client never sees two
-- different answers ('repeats' counts such extra runs). The entry is acknowledged and removed
-- from the queue in the same step, so it is never acknowledged without its outcome stored.
-- A dead-lettered job is also copied to the dead-letter stream with its original fields.
--
-- KEYS[1] job state hash   KEYS[2] queue stream   KEYS[3] reply stream (or any key when none)
-- KEYS[4] dead-letter stream  KEYS[5] tenant in-flight counter cc:{tenant}
-- ARGV[1] entry id  ARGV[2] group  ARGV[3] status  ARGV[4] result blob  ARGV[5] error text
-- ARGV[6] state TTL seconds  ARGV[7] job id  ARGV[8] '1' to reply  ARGV[9] reply stream cap
-- ARGV[10] tenant  ARGV[11] model  ARGV[12] finished (ms)  ARGV[13] dead-letter reason or ''
-- ARGV[14] '1' when the job was counted in flight (released with the first outcome)
-- ARGV[15..] original entry field/value pairs (dead-letter only)
-- Returns the status that was stored (the earlier one when the job had already finished).
local status, result, err
if redis.call('HSETNX', KEYS[1], 'final', '1') == 1 then
  redis.call('HSET', KEYS[1], 'status', ARGV[3], 'result', ARGV[4], 'error', ARGV[5],
             'finished', ARGV[12], 'tenant', ARGV[10], 'model', ARGV[11])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6]))
  status, result, err = ARGV[3], ARGV[4], ARGV[5]
  if ARGV[14] == '1' and tonumber(redis.call('DECR', KEYS[5])) < 0 then
    redis.call('SET', KEYS[5], 0, 'EX', 3600)
  end
else
  redis.call('HINCRBY', KEYS[1], 'repeats', 1)  -- ran again after a redelivery; its outcome is dropped
  local stored = redis.call('HMGET', KEYS[1], 'status', 'result', 'error')
  status, result, err = stored[1] or ARGV[3], stored[2] or '', stored[3] or ''
end
if ARGV[13] ~= '' then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', 100000, '*', 'reason', ARGV[13], unpack(ARGV, 15))
end
if ARGV[8] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', tonumber(ARGV[9]), '*', 'j', ARGV[7], 's', status, 'b', result, 'e', err)
end
redis.call('XACK', KEYS[2], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[2], ARGV[1])
return status
