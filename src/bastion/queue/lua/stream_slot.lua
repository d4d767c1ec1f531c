-- stream_slot.lua: the slots an open job event stream (SSE) holds: one in its tenant's in-flight
-- cap (the sorted set enqueue.lua uses for jobs) and one in its key's stream cap.
--
-- Guarantees: a stream is opened holding a slot of both caps, or refused holding neither; every
-- check runs before any change and no other client runs between them, so both caps hold exactly
-- across any number of gateway processes. A slot is scored by when it lapses: a live stream's
-- gateway refreshes it, and one never given back (its gateway died) lapses by itself instead of
-- holding the count up for ever. A refresh never re-creates a slot that lapsed (the stream ends
-- instead), so a stalled gateway cannot push a cap over its limit. Each set lives as long as its
-- longest slot. Time is Redis's own clock (TIME), never a gateway's.
-- Members are stream ids ('sse:...'), never job ids (those have no ':').
--
-- ARGV[1] op
-- 'open':    KEYS[1] inflight:{tenant}  KEYS[2] streams:{key id}
--            ARGV[2] slot lifetime (ms)  ARGV[3] member  ARGV[4] tenant in-flight cap (0: none;
--            only capped tenants take an in-flight slot, as in enqueue.lua)  ARGV[5] per-key cap
--            Returns {1, 1 if it took an in-flight slot else 0} or {0, 'key' | 'concurrency', held}.
-- 'refresh': for stream i (1-based): KEYS[3i-2] inflight:{tenant} ('' : it holds no in-flight
--            slot)  KEYS[3i-1] streams:{key id}  KEYS[3i] job:{id} it follows
--            ARGV[2] slot lifetime (ms)  ARGV[2+i] member of stream i
--            Returns, for each stream, its job's status ('' : the state is gone) and 1 if it
--            still holds its slots, else 0 (they lapsed), flattened: {status1, held1, ...}.
-- 'close':   KEYS[1] inflight:{tenant} ('' : none)  KEYS[2] streams:{key id}  ARGV[2] unused
--            ARGV[3] member. Gives both slots back; returns 1.
local op = ARGV[1]
local lifetime = tonumber(ARGV[2])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local extended = {}  -- sets whose TTL this call already pushed back
local function hold(key, member)
  redis.call('ZADD', key, now_ms + lifetime, member)
  if not extended[key] then
    extended[key] = true
    if redis.call('PTTL', key) < lifetime then
      redis.call('PEXPIRE', key, lifetime)
    end
  end
end

if op == 'open' then
  local member, cap, key_cap = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
  local streams = redis.call('ZCARD', KEYS[2])
  if streams >= key_cap then
    return {0, 'key', streams}
  end
  if cap > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)  -- slots whose holder never gave them back
    local held = redis.call('ZCARD', KEYS[1])
    if held >= cap then
      return {0, 'concurrency', held}
    end
    hold(KEYS[1], member)
  end
  hold(KEYS[2], member)
  return {1, cap > 0 and 1 or 0}
end

if op == 'refresh' then
  local out = {}
  for i = 1, #KEYS / 3 do
    local inflight, streams, job, member = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i], ARGV[2 + i]
    local held = false
    local score = redis.call('ZSCORE', streams, member)
    if score and tonumber(score) > now_ms then
      held = true
      if inflight ~= '' then
        local slot = redis.call('ZSCORE', inflight, member)
        held = slot ~= false and tonumber(slot) > now_ms
      end
    end
    if held then
      hold(streams, member)
      if inflight ~= '' then
        hold(inflight, member)
      end
    end
    out[#out + 1] = redis.call('HGET', job, 'status') or ''
    out[#out + 1] = held and 1 or 0
  end
  return out
end

if op == 'close' then
  if KEYS[1] ~= '' then
    redis.call('ZREM', KEYS[1], ARGV[3])
  end
  redis.call('ZREM', KEYS[2], ARGV[3])
  return 1
end
return redis.error_reply('stream_slot.lua: unknown op ' .. tostring(op))
