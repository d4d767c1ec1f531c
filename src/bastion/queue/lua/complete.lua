-- complete.lua: record a job's outcome exactly once, reply, acknowledge.
--
-- Guarantees: the first outcome written for a job id wins (store_outcome, outcome.lua); a
-- redelivered job that finishes again replies with the stored outcome, so a client never sees
-- two different answers ('repeats' counts such extra runs). The entry is acknowledged and
-- removed from the queue in the same step, so it is never acknowledged without its outcome
-- stored. A dead-lettered job is also copied to the dead-letter stream with its original fields.
--
-- KEYS[1] job state hash   KEYS[2] queue stream   KEYS[3] reply stream (or any key when none)
-- KEYS[4] dead-letter stream  KEYS[5] tenant in-flight set ('' when the job holds no slot)  KEYS[6] idempotency record ('' none)
-- ARGV[1] entry id  ARGV[2] group  ARGV[3] status  ARGV[4] result blob to keep  ARGV[5] error text
-- ARGV[6] state TTL seconds  ARGV[7] job id  ARGV[8] '1' to reply  ARGV[9] reply stream cap
-- ARGV[10] tenant  ARGV[11] model  ARGV[12] finished (ms)  ARGV[13] dead-letter reason or ''
-- ARGV[14] the result blob to reply with (ARGV[4] may be '' when the state must not hold outputs)
-- ARGV[15..] original entry field/value pairs (dead-letter only)
-- Returns {the status stored (the earlier one when the job had already finished), 1 when this
-- call stored it else 0, 1 when this call settles the job's cost else 0}.
local status, result, err = ARGV[3], ARGV[14], ARGV[5]
local stored = store_outcome(KEYS[1], tonumber(ARGV[6]), KEYS[5], KEYS[6], ARGV[7], ARGV[3], ARGV[4], ARGV[5],
                             {'result', ARGV[4], 'error', ARGV[5], 'finished', ARGV[12], 'tenant', ARGV[10],
                              'model', ARGV[11]})
if not stored then
  redis.call('HINCRBY', KEYS[1], 'repeats', 1)  -- ran again after a redelivery; its outcome is dropped
  local kept = redis.call('HMGET', KEYS[1], 'status', 'result', 'error')
  status, result, err = kept[1] or ARGV[3], kept[2] or '', kept[3] or ''
end
-- The first worker outcome settles the job's cost, whoever stored the outcome (an abandoning
-- gateway stores 'expired' but settles nothing): a job is refunded once, never twice.
local settle = redis.call('HSETNX', KEYS[1], 'settled', '1')
if redis.call('TTL', KEYS[1]) < 0 then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6]))  -- never leave a state without a TTL
end
if ARGV[13] ~= '' then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', 100000, '*', 'reason', ARGV[13], unpack(ARGV, 15))
end
if ARGV[8] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', tonumber(ARGV[9]), '*', 'j', ARGV[7], 's', status, 'b', result, 'e', err)
end
redis.call('XACK', KEYS[2], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[2], ARGV[1])
return {status, stored and 1 or 0, settle}
