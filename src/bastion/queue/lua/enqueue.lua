-- enqueue.lua: admission (queue length, compute-cost buckets, in-flight cap) + job state + XADD,
-- atomically.
--
-- Guarantees: a job is either refused or appended to the model's stream together with its
-- state hash (async jobs), its reserved cost taken from every bucket and a slot of its tenant's
-- in-flight cap taken; never part of that. Every check runs before any change, and no other
-- client can run between them, so a budget holds exactly across any number of gateway
-- processes. Time is Redis's own clock (TIME), never a gateway's.
--
-- A bucket is a hash {tokens, ts, rate, burst} in compute units; its TTL is the time it takes to
-- refill, so an idle bucket disappears (and is full again), and no key lives without a TTL.
-- The price of a row is the version's learned cost (cost:{model}:{version}, from jobs that ran),
-- never below the floor; the default until it is measured.
-- The in-flight cap is a sorted set of job ids scored by when each slot lapses: a slot is given
-- back with the job's outcome, and one that was never given back (a lost reply) lapses by itself
-- instead of holding the count up for ever.
-- The stored-result ledger (async jobs of a tenant only; KEYS[8], KEYS[9] given) counts the
-- tenant's queued and kept results: a sorted set of job ids scored by when each one's state
-- expires (ms), and a hash of each kept result's bytes with their 'total' (outcome.lua writes
-- them, and 'done': how many have an outcome). A submission is refused when the count reaches its
-- cap, or when the bytes kept plus the queued jobs' results expected at the average size reach the
-- byte cap (complete.lua holds the byte bound itself: a result that would pass it is not kept).
-- Up to 100 expired entries are pruned per call (their bytes subtracted); a job that never got an
-- outcome leaves with its state. Both keys live as long as their longest entry.
--
-- KEYS[1] queue stream q:{model}:{lane}     KEYS[2] job state hash job:{id}
-- KEYS[3] tenant bucket rl:t:{tenant}:{model}   KEYS[4] key bucket rl:k:{key id}
-- KEYS[5] tenant in-flight set inflight:{tenant}  KEYS[6] version cost hash cost:{model}:{version}
-- KEYS[7] idempotency record idem:{tenant}:{key digest} (any key when none)
-- ARGV[1] queue length limit  ARGV[2] '1' to create the job state hash (async)  ARGV[3] state TTL s
-- ARGV[4] tenant  ARGV[5] model  ARGV[6] created (ms)  ARGV[7] rows
-- ARGV[8] tenant rate  ARGV[9] tenant burst (0: no bucket)  ARGV[10] key rate  ARGV[11] key burst
-- ARGV[12] in-flight cap (0: none; only capped tenants take slots)
-- ARGV[13] cost per row while the version is not measured  ARGV[14] lowest cost per row
-- ARGV[15] request fingerprint for the idempotency record ('' : no Idempotency-Key)
-- ARGV[16] idempotency record TTL s  ARGV[17] job id  ARGV[18] in-flight slot lifetime (ms)
-- ARGV[19] version
-- KEYS[8] stored-result ledger stored:{tenant}  KEYS[9] its bytes storedb:{tenant} (only with a ledger)
-- ARGV[20] stored results cap (0: no ledger)  ARGV[21] stored result bytes cap
-- A text job (embedding, generation) has four more KEYS, the last ones (so #KEYS >= 11): its
-- buckets of tenant tokens rl:tt:{tenant}:{model}, tenant requests rl:tr:{tenant}:{model}, key
-- tokens rl:kt:{key id} and key requests rl:kr:{key id}; and nine more ARGV before the envelope:
-- ARGV[22] its text tokens (prompt + max_tokens), ARGV[23..30] each bucket's (refill per minute,
-- burst (0: no bucket)) in that order. It takes the tokens from each token bucket and 1 from each
-- request bucket, and its entry gets field 't' = the tokens (settle.lua gives back what it did
-- not use). Any other job's call is exactly what it was before text jobs: no text bucket.
-- ARGV[22..] (not a text job) or ARGV[31..] (a text job): stream entry field/value pairs (the envelope)
-- Returns {1, entry-id, cost, tenant units left or '', key units left or '', 1 if it took a slot}
-- when queued, a text job's followed by its four text buckets' levels left (or ''), or
-- {0, reason, detail...}: {'queue', length}, {'concurrency', in flight},
-- {'tenant' | 'key', units, cost, rate per second, burst},
-- {'tenant_tokens' | 'tenant_requests' | 'key_tokens' | 'key_requests', level, need, rate per
-- minute, burst}, {'idempotency'} (the key was used for another
-- request), {'stored' | 'stored_bytes', held, cap, seconds until the oldest stored result
-- expires}, or {2, job id} when the key was already used for this request (nothing is queued).
if ARGV[15] ~= '' then
  local seen = redis.call('HMGET', KEYS[7], 'fp', 'job')
  if seen[1] then
    if seen[1] ~= ARGV[15] then
      return {0, 'idempotency'}
    end
    return {2, seen[2]}
  end
end
local len = redis.call('XLEN', KEYS[1])
if len >= tonumber(ARGV[1]) then
  return {0, 'queue', len}
end
local per_row = math.max(tonumber(redis.call('HGET', KEYS[6], 'per_row') or ARGV[13]), tonumber(ARGV[14]))
local cost = tonumber(ARGV[7]) * per_row
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local now_ms = math.floor(now * 1000)

local max_stored = tonumber(ARGV[20])
if max_stored > 0 then
  local stale = redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', now_ms, 'LIMIT', 0, 100)
  if #stale > 0 then
    local freed, ended = 0, 0
    for _, size in ipairs(redis.call('HMGET', KEYS[9], unpack(stale))) do
      if size then
        freed, ended = freed + tonumber(size), ended + 1
      end
    end
    redis.call('ZREM', KEYS[8], unpack(stale))
    redis.call('HDEL', KEYS[9], unpack(stale))
    if freed > 0 then
      redis.call('HINCRBY', KEYS[9], 'total', -freed)
    end
    if ended > 0 then
      redis.call('HINCRBY', KEYS[9], 'done', -ended)
    end
  end
  local live = '(' .. string.format('%d', now_ms)
  local held = redis.call('ZCOUNT', KEYS[8], live, '+inf')
  local sums = redis.call('HMGET', KEYS[9], 'total', 'done')
  local bytes, done = tonumber(sums[1] or '0'), tonumber(sums[2] or '0')
  if done > 0 and held > done then  -- queued jobs are expected to keep results of the average size
    bytes = bytes + math.floor((held - done) * bytes / done)
  end
  local max_bytes = tonumber(ARGV[21])
  if held >= max_stored or bytes >= max_bytes then
    local oldest = redis.call('ZRANGEBYSCORE', KEYS[8], live, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    local wait = 1
    if #oldest == 2 then
      wait = math.max(1, math.ceil((tonumber(oldest[2]) - now_ms) / 1000))
    end
    if held >= max_stored then
      return {0, 'stored', held, max_stored, wait}
    end
    return {0, 'stored_bytes', string.format('%d', bytes), string.format('%d', max_bytes), wait}
  end
end

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
local text, first = 0, 22  -- tokens to reserve, and where the envelope starts
local held_text
if #KEYS >= 11 then  -- a text job: its four buckets are the last KEYS
  text, first, held_text = tonumber(ARGV[22]), 31, {}
  local base = #KEYS - 4
  for i, name in ipairs({'tenant_tokens', 'tenant_requests', 'key_tokens', 'key_requests'}) do
    local rate, burst = tonumber(ARGV[21 + 2 * i]) / 60, tonumber(ARGV[22 + 2 * i])
    if burst > 0 then
      local need = (i % 2 == 1) and text or 1
      local tokens = level(KEYS[base + i], rate, burst)
      if tokens < need then
        return {0, name, tostring(tokens), tostring(need), ARGV[21 + 2 * i], tostring(burst)}
      end
      held_text[i] = {KEYS[base + i], tokens - need, rate, burst}
    end
  end
end
local cap = tonumber(ARGV[12])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now_ms)  -- slots whose job never gave them back
  local held = redis.call('ZCARD', KEYS[5])
  if held >= cap then
    return {0, 'concurrency', held}
  end
end

local function take(key, left, rate, burst)  -- its TTL: the time it takes to refill
  redis.call('HSET', key, 'tokens', tostring(left), 'ts', tostring(now), 'rate', tostring(rate), 'burst',
             tostring(burst))
  local ttl = 86400
  if rate > 0 then ttl = math.min(86400, math.ceil(burst / rate) + 60) end
  redis.call('EXPIRE', key, ttl)
  return tostring(left)
end
local left = {'', ''}
for i = 1, 2 do
  local b = buckets[i]
  if b then
    left[i] = take(b[1], b[2] - cost, b[3], b[4])
  end
end
local fields = {'c', tostring(cost), 'q', '0'}
if text > 0 then
  for i = 1, 4 do
    local b = held_text[i]
    left[2 + i] = b and take(b[1], b[2], b[3], b[4]) or ''
  end
  fields[5], fields[6] = 't', tostring(text)
end
if cap > 0 then
  local lifetime = tonumber(ARGV[18])
  redis.call('ZADD', KEYS[5], now_ms + lifetime, ARGV[17])
  if redis.call('PTTL', KEYS[5]) < lifetime then  -- the set lives as long as its longest slot
    redis.call('PEXPIRE', KEYS[5], lifetime)
  end
  fields[4] = '1'  -- the outcome (the worker's or an abandoning gateway's) gives the slot back
end
for i = first, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[2], 'tenant', ARGV[4], 'model', ARGV[5], 'version', ARGV[19], 'status', 'queued',
             'created', ARGV[6])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
end
if max_stored > 0 then
  local life = tonumber(ARGV[3]) * 1000
  redis.call('ZADD', KEYS[8], now_ms + life, ARGV[17])
  if redis.call('PTTL', KEYS[8]) < life then  -- the ledger lives as long as its longest entry
    redis.call('PEXPIRE', KEYS[8], life)
  end
end
local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
if ARGV[15] ~= '' then
  redis.call('HSET', KEYS[7], 'fp', ARGV[15], 'job', ARGV[17])
  redis.call('EXPIRE', KEYS[7], tonumber(ARGV[16]))
end
if text > 0 then
  return {1, id, tostring(cost), left[1], left[2], cap > 0 and 1 or 0, left[3], left[4], left[5], left[6]}
end
return {1, id, tostring(cost), left[1], left[2], cap > 0 and 1 or 0}
