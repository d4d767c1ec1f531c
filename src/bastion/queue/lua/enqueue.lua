-- enqueue.lua: admission (queue length, compute-cost buckets, concurrency cap) + job state + XADD,
-- atomically.
--
-- Guarantees: a job is either refused or appended to the model's stream together with its
-- state hash (async jobs), its reserved cost taken from every bucket and its tenant's in-flight
-- count raised; never part of that. Every check runs before any change, and no other client can
-- run between them, so a budget holds exactly across any number of gateway processes. Time is
-- Redis's own clock (TIME), never a gateway's.
--
-- A bucket is a hash {tokens, ts, rate, burst} in compute units; its TTL is the time it takes to
-- refill, so an idle bucket disappears (and is full again), and no key lives without a TTL.
--
-- KEYS[1] queue stream q:{model}:{lane}     KEYS[2] job state hash job:{id}
-- KEYS[3] tenant bucket rl:t:{tenant}:{model}   KEYS[4] key bucket rl:k:{key id}
-- KEYS[5] tenant in-flight counter cc:{tenant}  KEYS[6] model cost hash cost:{model}
-- KEYS[7] idempotency record idem:{tenant}:{key digest} (any key when none)
-- ARGV[1] queue length limit  ARGV[2] '1' to create the job state hash (async)  ARGV[3] state TTL s
-- ARGV[4] tenant  ARGV[5] model  ARGV[6] created (ms)  ARGV[7] rows
-- ARGV[8] tenant rate  ARGV[9] tenant burst (0: no bucket)  ARGV[10] key rate  ARGV[11] key burst
-- ARGV[12] in-flight cap (0: none; only capped tenants are counted)  ARGV[13] cost per row when the model is not measured yet
-- ARGV[14] request fingerprint for the idempotency record ('' : no Idempotency-Key)
-- ARGV[15] idempotency record TTL s  ARGV[16] job id
-- ARGV[17..] stream entry field/value pairs
-- Returns {1, entry-id, cost, tenant tokens left or '', key tokens left or '', 1 if counted in flight}
-- when queued, or
-- {0, reason, detail...}: {'queue', length}, {'concurrency', in flight},
-- {'tenant' | 'key', tokens, cost, rate, burst}, {'idempotency'} (the key was used for another
-- request), or {2, job id} when the key was already used for this request (nothing is queued).
if ARGV[14] ~= '' then
  local seen = redis.call('HMGET', KEYS[7], 'fp', 'job')
  if seen[1] then
    if seen[1] ~= ARGV[14] then
      return {0, 'idempotency'}
    end
    return {2, seen[2]}
  end
end
local len = redis.call('XLEN', KEYS[1])
if len >= tonumber(ARGV[1]) then
  return {0, 'queue', len}
end
local per_row = tonumber(redis.call('HGET', KEYS[6], 'per_row') or ARGV[13])
local cost = tonumber(ARGV[7]) * per_row
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

local function level(key, rate, burst)
  local s = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens, ts = tonumber(s[1]), tonumber(s[2])
  if tokens == nil or ts == nil then
    return burst
  end
  return math.min(burst, tokens + math.max(0, now - ts) * rate)
end

local buckets = {}
for i, spec in ipairs({{KEYS[3], ARGV[8], ARGV[9], 'tenant'}, {KEYS[4], ARGV[10], ARGV[11], 'key'}}) do
  local rate, burst = tonumber(spec[2]), tonumber(spec[3])
  if burst > 0 then
    local tokens = level(spec[1], rate, burst)
    if tokens < cost then
      return {0, spec[4], tostring(tokens), tostring(cost), tostring(rate), tostring(burst)}
    end
    buckets[i] = {spec[1], tokens, rate, burst}
  end
end
local cap = tonumber(ARGV[12])
if cap > 0 and tonumber(redis.call('GET', KEYS[5]) or '0') >= cap then
  return {0, 'concurrency', redis.call('GET', KEYS[5])}
end

local left = {'', ''}
for i = 1, 2 do
  local b = buckets[i]
  if b then
    redis.call('HSET', b[1], 'tokens', tostring(b[2] - cost), 'ts', tostring(now), 'rate', tostring(b[3]),
               'burst', tostring(b[4]))
    local ttl = 86400
    if b[3] > 0 then ttl = math.min(86400, math.ceil(b[4] / b[3]) + 60) end
    redis.call('EXPIRE', b[1], ttl)
    left[i] = tostring(b[2] - cost)
  end
end
local fields = {'c', tostring(cost)}
if cap > 0 then
  redis.call('INCR', KEYS[5])
  redis.call('EXPIRE', KEYS[5], 3600)
  fields[3], fields[4] = 'q', '1'  -- the worker (or an abandoning gateway) releases it with the outcome
end
for i = 17, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[2], 'tenant', ARGV[4], 'model', ARGV[5], 'status', 'queued', 'created', ARGV[6])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
end
local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
if ARGV[14] ~= '' then
  redis.call('HSET', KEYS[7], 'fp', ARGV[14], 'job', ARGV[16])
  redis.call('EXPIRE', KEYS[7], tonumber(ARGV[15]))
end
return {1, id, tostring(cost), left[1], left[2], #fields > 2 and fields[3] == 'q' and 1 or 0}
