-- Record one abuse event against one or more subjects, banning those that cross the threshold.
--
-- KEYS, three per subject:  events (sorted set, scored by ms), ban (string), offences (counter)
-- ARGV[1]  event name (stored in the ban as its reason)
-- ARGV[2]  sliding window, ms
-- ARGV[3]  threshold: events within the window that trigger a ban
-- ARGV[4]  first ban, s; each offence within the memory doubles it
-- ARGV[5]  longest ban, s
-- ARGV[6]  offence memory, s, counted from the end of the ban
-- ARGV[7]  a member unique to this call (several events may share a millisecond)
--
-- Returns, per subject, two numbers: the ban just imposed in seconds (0: none) and its offence
-- number. A subject already banned records nothing (it cannot offend again while its requests
-- are refused). Time is the Redis server's.

local event = ARGV[1]
local window_ms = tonumber(ARGV[2])
local threshold = tonumber(ARGV[3])
local first_ban_s = tonumber(ARGV[4])
local max_ban_s = tonumber(ARGV[5])
local memory_s = tonumber(ARGV[6])
local member = ARGV[7]

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)

local imposed = {}
for first = 1, #KEYS, 3 do
  local events_key, ban_key, offences_key = KEYS[first], KEYS[first + 1], KEYS[first + 2]
  local ban_s, offence = 0, 0
  if redis.call('EXISTS', ban_key) == 0 then
    redis.call('ZREMRANGEBYSCORE', events_key, '-inf', now_ms - window_ms)
    redis.call('ZADD', events_key, now_ms, member)
    redis.call('PEXPIRE', events_key, window_ms)
    if redis.call('ZCARD', events_key) >= threshold then
      offence = redis.call('INCR', offences_key)
      ban_s = math.min(max_ban_s, first_ban_s * 2 ^ (offence - 1))
      redis.call('EXPIRE', offences_key, ban_s + memory_s)
      redis.call('SET', ban_key, cjson.encode({reason = event, offence = offence, duration_s = ban_s}), 'EX', ban_s)
      -- The next ban needs a fresh run of events, not the tail of this one.
      redis.call('DEL', events_key)
    end
  end
  imposed[#imposed + 1] = ban_s
  imposed[#imposed + 1] = offence
end
return imposed
