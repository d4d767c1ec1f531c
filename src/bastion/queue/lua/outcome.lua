-- outcome.lua: the one way a job's outcome is stored; the first lines of complete.lua and
-- abandon.lua (bastion.queue.scripts prepends it to them).
--
-- Guarantees: the first outcome stored for a job id wins (HSETNX on 'final'); with it, and
-- only with it, the job's in-flight slot is given back and, for a sync job that carries an
-- Idempotency-Key record, the outcome is kept there for the key's retries ('expired' is not
-- kept: the record is deleted, so a retry runs the job again). A record that names another job
-- (the key was reused after it lapsed), or that holds an outcome already, is left alone: a sync
-- job's state hash lives only minutes while its record lives a day, so a very late redelivery
-- can find no 'final' flag and must not replace (or delete) the answer the record keeps.

-- Store the outcome of job ``job_id`` in hash ``state`` (``fields``: flat field/value pairs,
-- ``status`` among them); returns true when this call stored it, false when it already had one.
local function store_outcome(state, ttl, inflight, idem, job_id, status, result, err, fields)
  if redis.call('HSETNX', state, 'final', '1') == 0 then
    return false
  end
  redis.call('HSET', state, 'status', status, unpack(fields))
  redis.call('EXPIRE', state, ttl)
  if inflight ~= '' then  -- '': the job held no in-flight slot
    redis.call('ZREM', inflight, job_id)
  end
  if idem ~= '' and redis.call('HGET', idem, 'job') == job_id and redis.call('HEXISTS', idem, 'status') == 0 then
    if status == 'expired' then
      redis.call('DEL', idem)
    else
      redis.call('HSET', idem, 'status', status, 'result', result, 'error', err)
    end
  end
  return true
end
