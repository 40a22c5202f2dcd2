-- Concurrency leases: at most `limit` requests in flight per principal, across every replica.
--
-- KEYS[1]  the principal's leases: a sorted set {lease id -> expiry in ms, Redis server time}
-- ARGV[1]  "acquire", "renew" or "release"
-- ARGV[2]  lease id (random per request)
-- ARGV[3]  limit (acquire only)
-- ARGV[4]  lease lifetime in ms (acquire and renew)
--
-- Returns {granted (1/0), leases held after the call}.
-- Leases expire on their own, so a replica that dies while holding some leaks them for at most
-- one lifetime; a live holder renews before that. Expired leases are purged on every call.
-- Time comes from the Redis server (TIME), so replicas with skewed clocks agree.

local op = ARGV[1]
local lease = ARGV[2]
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)

local granted = 0
if op == 'release' then
  redis.call('ZREM', KEYS[1], lease)
  granted = 1
else
  local ttl_ms = tonumber(ARGV[4])
  local expiry = string.format('%.0f', now_ms + ttl_ms)
  if op == 'renew' then
    -- A lease that already expired (its holder stalled past its lifetime) is not revived.
    if redis.call('ZSCORE', KEYS[1], lease) then
      redis.call('ZADD', KEYS[1], 'XX', expiry, lease)
      granted = 1
    end
  elseif redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
    redis.call('ZADD', KEYS[1], expiry, lease)
    granted = 1
  end
end

local held = redis.call('ZCARD', KEYS[1])
if held > 0 then
  -- The set lives as long as its longest lease: an idle principal leaves nothing behind.
  local latest = tonumber(redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2])
  redis.call('PEXPIREAT', KEYS[1], string.format('%.0f', latest))
end
return {granted, held}
