-- cached.lua: answer from the response cache, and log that decision in the same step.
--
-- Guarantees: a cache hit with the decision log on (KEYS[2] given) appends exactly one event to
-- the audit stream - the gateway's event ARGV[1] (bastion.queue.decisions), the cached outputs
-- and, when the tenant keeps payloads, the inputs ARGV[2] - so no answer leaves the cache
-- without its event. A miss writes nothing. The audit stream is never trimmed here.
-- KEYS[1] response-cache entry  KEYS[2] audit stream ('' decision log off)
-- ARGV[1] the decision-log event  ARGV[2] the inputs to log ('' not kept)
-- Returns the cached outputs, or false on a miss.
local hit = redis.call('GET', KEYS[1])
if not hit then
  return false
end
if KEYS[2] ~= '' then
  if ARGV[2] ~= '' then
    redis.call('XADD', KEYS[2], '*', 'e', ARGV[1], 'o', hit, 'i', ARGV[2])
  else
    redis.call('XADD', KEYS[2], '*', 'e', ARGV[1], 'o', hit)
  end
end
return hit
