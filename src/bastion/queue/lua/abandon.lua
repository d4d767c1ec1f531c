-- abandon.lua: a gateway gave up waiting for a sync job; record that as its outcome.
--
-- Guarantees: the same first-outcome-wins rule as complete.lua (store_outcome, outcome.lua), so
-- a worker that finishes the job later cannot store a second, different answer for the
-- client's job id; the in-flight slot is given back and the Idempotency-Key record dropped (a
-- retry runs again) by whichever outcome is stored first.
-- KEYS[1] job state hash  KEYS[2] tenant in-flight set ('' when the job holds no slot)  KEYS[3] idempotency record ('' none)
-- ARGV[1] job id  ARGV[2] tenant  ARGV[3] model  ARGV[4] error text  ARGV[5] TTL seconds
-- ARGV[6] finished (ms)
-- Returns 1 when this call stored the outcome, 0 when the job already had one.
local stored = store_outcome(KEYS[1], tonumber(ARGV[5]), KEYS[2], KEYS[3], ARGV[1], 'expired', '', ARGV[4],
                             {'error', ARGV[4], 'tenant', ARGV[2], 'model', ARGV[3], 'finished', ARGV[6]})
return stored and 1 or 0
