-- abandon.lua: a gateway gave up waiting for a sync job; record that as its outcome.
--
-- Guarantees: the same first-outcome-wins rule as complete.lua (HSETNX on 'final'), so a worker
-- that finishes the job later cannot store a second, different answer for the client's job id;
-- the tenant's in-flight count is released by whichever outcome is stored first.
-- KEYS[1] job state hash  KEYS[2] tenant in-flight counter cc:{tenant}
-- ARGV[1] tenant  ARGV[2] model  ARGV[3] error text  ARGV[4] TTL seconds  ARGV[5] finished (ms)
-- ARGV[6] '1' when the job was counted in flight
-- Returns 1 when this call stored the outcome, 0 when the job already had one.
if redis.call('HSETNX', KEYS[1], 'final', '1') == 1 then
  redis.call('HSET', KEYS[1], 'status', 'expired', 'error', ARGV[3], 'tenant', ARGV[1], 'model', ARGV[2],
             'finished', ARGV[5])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
  if ARGV[6] == '1' and tonumber(redis.call('DECR', KEYS[2])) < 0 then
    redis.call('SET', KEYS[2], 0, 'EX', 3600)
  end
  return 1
end
return 0
