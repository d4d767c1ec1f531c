-- complete.lua: record a job's outcome exactly once, reply, acknowledge.
--
-- Guarantees: the first outcome written for a job id wins (store_outcome, outcome.lua); a
-- redelivered job that finishes again replies with the stored outcome, so a client never sees
-- two different answers ('repeats' counts such extra runs). The entry is acknowledged and
-- removed from the queue in the same step, so it is never acknowledged without its outcome
-- stored. A dead-lettered job is also copied to the dead-letter stream with its original fields
-- (calls.py leaves out an input too large to keep); the stream keeps at most ARGV[16] letters,
-- none older than ARGV[17] ms (trimmed exactly on each new letter: letters are rare, and an
-- approximate trim keeps whole nodes of 100), and it expires once its newest letter is that old.
-- A tenant's async job (KEYS[7] given) records its result's bytes in the tenant's stored-result
-- ledger (keep_result, outcome.lua), and its outcome is announced on ARGV[15] (its job id). A
-- result that would take the tenant's stored bytes past ARGV[18] (> 0) is not kept: the job is
-- stored as failed, with the reason, so no tenant holds more result bytes than its bound
-- (admission checks the bytes already held; this checks the result that would be added).
-- A decision (ARGV[19] given: the decision-log event, bastion.queue.decisions) whose outcome
-- this call stores as succeeded is appended to the audit stream KEYS[9] in the same step, with
-- the outputs answered and, when the tenant keeps payloads, the inputs (ARGV[20]): so there is
-- no decision without its event and never two (a repeat after a redelivery stores nothing).
-- The audit stream is never trimmed here: the control plane deletes what it has logged.
--
-- KEYS[1] job state hash   KEYS[2] queue stream   KEYS[3] reply stream (or any key when none)
-- KEYS[4] dead-letter stream  KEYS[5] tenant in-flight set ('' when the job holds no slot)  KEYS[6] idempotency record ('' none)
-- KEYS[7] stored-result ledger stored:{tenant}  KEYS[8] its bytes storedb:{tenant} ('' '' when none)
-- KEYS[9] audit stream ('' when the job is no decision or the decision log is off)
-- ARGV[1] entry id  ARGV[2] group  ARGV[3] status  ARGV[4] result blob to keep  ARGV[5] error text
-- ARGV[6] state TTL seconds  ARGV[7] job id  ARGV[8] '1' to reply  ARGV[9] reply stream cap
-- ARGV[10] tenant  ARGV[11] model  ARGV[12] finished (ms)  ARGV[13] dead-letter reason or ''
-- ARGV[14] the result blob to reply with (ARGV[4] may be '' when the state must not hold outputs)
-- ARGV[15] job events channel ('' : not announced)  ARGV[16] dead letters kept
-- ARGV[17] oldest dead letter kept (ms of age)  ARGV[18] the tenant's stored-result bytes bound (0: none)
-- ARGV[19] the decision-log event ('' none)  ARGV[20] the inputs to log with it ('' not kept)
-- ARGV[21..] dead letter field/value pairs (dead-letter only)
-- Returns {the status stored (the earlier one when the job had already finished), 1 when this
-- call stored it else 0, 1 when this call settles the job's cost else 0}.
local status, result, err = ARGV[3], ARGV[14], ARGV[5]
local kept = ARGV[4]
local bound = tonumber(ARGV[18])
if KEYS[7] ~= '' and bound > 0 and #kept > 0 and redis.call('HEXISTS', KEYS[1], 'final') == 0 then
  local held = tonumber(redis.call('HGET', KEYS[8], 'total') or '0')
               - tonumber(redis.call('HGET', KEYS[8], ARGV[7]) or '0')
  if held + #kept > bound then
    status, result, kept = 'failed', '', ''
    err = string.format('the result is %d bytes; with the %d bytes of results the tenant holds it would pass '
                        .. 'the bound of %d (max_stored_result_bytes), so it was not kept', #ARGV[4], held, bound)
  end
end
local stored = store_outcome(KEYS[1], tonumber(ARGV[6]), KEYS[5], KEYS[6], ARGV[7], status, kept, err,
                             {'result', kept, 'error', err, 'finished', ARGV[12], 'tenant', ARGV[10],
                              'model', ARGV[11]})
if stored then
  if KEYS[7] ~= '' then
    keep_result(KEYS[7], KEYS[8], ARGV[7], #kept, tonumber(ARGV[6]))
  end
  if ARGV[15] ~= '' then
    redis.call('PUBLISH', ARGV[15], ARGV[7])
  end
  if KEYS[9] ~= '' and ARGV[19] ~= '' and status == 'succeeded' then
    if ARGV[20] ~= '' then
      redis.call('XADD', KEYS[9], '*', 'e', ARGV[19], 'o', result, 'i', ARGV[20])
    else
      redis.call('XADD', KEYS[9], '*', 'e', ARGV[19], 'o', result)
    end
  end
else
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
  local max_age = tonumber(ARGV[17])
  local t = redis.call('TIME')
  local oldest = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - max_age
  redis.call('XADD', KEYS[4], 'MAXLEN', '=', tonumber(ARGV[16]), '*', 'reason', ARGV[13], unpack(ARGV, 21))
  redis.call('XTRIM', KEYS[4], 'MINID', '=', string.format('%d', math.max(oldest, 0)))
  redis.call('PEXPIRE', KEYS[4], max_age)
end
if ARGV[8] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', tonumber(ARGV[9]), '*', 'j', ARGV[7], 's', status, 'b', result, 'e', err)
end
redis.call('XACK', KEYS[2], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[2], ARGV[1])
return {status, stored and 1 or 0, settle}
