-- strike.lua: count a client's failures; tarpit past one threshold, ban past another.
--
-- A failure is an answer of 400, 401, 403, 404, 413, 415 or 422 (a spent budget's 429 is not
-- abuse, and a banned client's 429 is given before anything is counted). Each client id (an address
-- 'a:...' and, once authenticated, a key 'k:...') has a strike counter over a sliding-start
-- window; past ``tarpit_after`` strikes its failures are answered slowly (the delay grows per
-- strike, capped), at ``ban_after`` it is banned for ``ban_s`` x 2^(bans in the last day - 1),
-- capped, and every gateway is told on the ban channel (ARGV[8]). A ban is also recorded in the
-- set of live bans (the last KEY: id -> ban end, epoch seconds by the server's clock), from which
-- a gateway that (re)connects loads them without scanning the keyspace; each ban trims the ended
-- ones from it. All keys carry a TTL (the set: the longest ban, renewed by every ban).
--
-- KEYS: per id, three keys: strike:{id}, ban:{id}, bans:{id}; then the set of live bans
-- ARGV[1] window s  ARGV[2] tarpit_after  ARGV[3] ban_after  ARGV[4] step ms  ARGV[5] max delay ms
-- ARGV[6] ban s  ARGV[7] max ban s  ARGV[8] ban channel  ARGV[9..] the ids, in KEYS order
-- Returns {delay ms, longest ban s (0: none)}.
local delay, banned = 0, 0
local tarpit_after, ban_after = tonumber(ARGV[2]), tonumber(ARGV[3])
local live = KEYS[#KEYS]
for i = 0, ((#KEYS - 1) / 3) - 1 do
  local strikes, ban, bans = KEYS[i * 3 + 1], KEYS[i * 3 + 2], KEYS[i * 3 + 3]
  local n = redis.call('INCR', strikes)
  if n == 1 then
    redis.call('EXPIRE', strikes, tonumber(ARGV[1]))
  end
  if n > tarpit_after then
    delay = math.max(delay, math.min(tonumber(ARGV[5]), (n - tarpit_after) * tonumber(ARGV[4])))
  end
  if n >= ban_after then
    local b = redis.call('INCR', bans)
    redis.call('EXPIRE', bans, 86400)
    local seconds = math.min(tonumber(ARGV[7]), tonumber(ARGV[6]) * 2 ^ (b - 1))
    redis.call('SET', ban, '1', 'EX', seconds)
    redis.call('DEL', strikes)
    local clock = redis.call('TIME')
    local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
    redis.call('ZREMRANGEBYSCORE', live, '-inf', now)
    redis.call('ZADD', live, now + seconds, ARGV[9 + i])
    redis.call('EXPIRE', live, tonumber(ARGV[7]))
    redis.call('PUBLISH', ARGV[8], ARGV[9 + i] .. '|' .. seconds)
    banned = math.max(banned, seconds)
  end
end
return {delay, banned}
