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
--
-- keep_result records a tenant's stored async result in its ledger (see enqueue.lua): the
-- result's bytes (the total corrected by what the entry held before) and the entry re-scored to
-- when the result expires; both ledger keys live at least that long.

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

-- Record the stored result of async job ``job_id`` (``size`` bytes, kept ``ttl`` seconds) in the
-- tenant's ledger: sorted set ``ledger`` and bytes hash ``sizes`` (its field ``total`` is the sum,
-- ``done`` the number of jobs with an outcome; the other entries of the set are still queued).
local function keep_result(ledger, sizes, job_id, size, ttl)
  local t = redis.call('TIME')
  local life = ttl * 1000
  local expires = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + life
  local had = redis.call('HGET', sizes, job_id)
  local before = tonumber(had or '0')
  redis.call('HSET', sizes, job_id, size)
  if not had then
    redis.call('HINCRBY', sizes, 'done', 1)
  end
  if size ~= before then
    redis.call('HINCRBY', sizes, 'total', size - before)
  end
  redis.call('ZADD', ledger, expires, job_id)
  for _, key in ipairs({ledger, sizes}) do
    if redis.call('PTTL', key) < life then
      redis.call('PEXPIRE', key, life)
    end
  end
end
