-- Token bucket: refill by elapsed time, then take `cost` tokens, atomically.
--
-- KEYS[1]  the bucket: a hash {tokens, updated_us}; absent means full
-- KEYS[2..] keys that block the take while any of them exists (bans): read in the same round trip,
--          and while one exists nothing is charged
-- ARGV[1]  capacity (tokens; may be fractional)
-- ARGV[2]  refill rate (tokens per second)
-- ARGV[3]  cost (tokens to take; fractional, e.g. audio seconds); negative gives tokens back (a
--          refund of work not done), never beyond the capacity
-- ARGV[4]  "1" to charge; "0" to only ask whether `cost` would be admitted (nothing is written)
--
-- Returns {allowed (1/0), remaining, retry_after_s, reset_s, then for each blocking key its value
-- (false when absent) and PTTL}; numbers as strings because Redis truncates Lua numbers to integers
-- in replies. A denied or blocked take charges nothing.
--
-- Time comes from the Redis server (TIME), never from the caller, so replicas on hosts with
-- skewed clocks agree. Scripts are replicated by effects (Redis >= 5), so TIME is allowed
-- before writes.

local capacity = tonumber(ARGV[1])
local refill_per_s = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local charge = ARGV[4] == "1"

local blockers = {}
for index = 2, #KEYS do
  local value = redis.call('GET', KEYS[index])
  if value then
    charge = false
  end
  blockers[#blockers + 1] = value
  blockers[#blockers + 1] = redis.call('PTTL', KEYS[index])
end

local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])

local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated_us')
local tokens = tonumber(state[1])
local updated_us = tonumber(state[2])
if tokens == nil or updated_us == nil then
  tokens = capacity
  updated_us = now_us
end

-- Clamp to capacity: the capacity may have shrunk since the last take (load shedding).
local elapsed_s = math.max(0, now_us - updated_us) / 1000000
tokens = math.min(capacity, tokens + elapsed_s * refill_per_s)

local allowed = cost <= tokens
local retry_after_s = 0
if allowed then
  if charge and cost ~= 0 then
    tokens = math.min(capacity, tokens - cost)
    local reset_ms = math.ceil((capacity - tokens) / refill_per_s * 1000)
    -- %.0f: tostring() keeps only 14 significant digits, and a time in microseconds has 16.
    redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated_us', string.format('%.0f', now_us))
    -- Once the bucket would be full again the key carries no information: let it go.
    redis.call('PEXPIRE', KEYS[1], math.max(1, reset_ms))
  end
else
  -- A cost above the capacity never fits at this capacity: point at the time it is full.
  retry_after_s = (math.min(cost, capacity) - tokens) / refill_per_s
end

local reset_s = (capacity - tokens) / refill_per_s
local reply = {allowed and 1 or 0, tostring(tokens), tostring(retry_after_s), tostring(reset_s)}
for _, value in ipairs(blockers) do
  reply[#reply + 1] = value
end
return reply
