-- Create a queued job and enqueue it, atomically, unless its owner is at the active-jobs cap.
--
-- KEYS[1] the job hash          KEYS[2] the owner's index (sorted set: sequence -> id)
-- KEYS[3] the owner's active set KEYS[4] the owner's sequence counter
-- KEYS[5] the work stream        KEYS[6] the jobs-by-state counters (hash)
-- KEYS[7] the idempotency key, or "" when the submission has none
-- ARGV[1] job id  ARGV[2] active-jobs cap  ARGV[3] idempotency value  ARGV[4] its TTL (s)
-- ARGV[5..] field, value pairs of the job hash
--
-- Returns {1, sequence} when created, {0, active} when the owner is at the cap (nothing written).

local active = redis.call("SCARD", KEYS[3])
if active >= tonumber(ARGV[2]) then
  return {0, active}
end
local sequence = redis.call("INCR", KEYS[4])
local fields = {}
for index = 5, #ARGV do
  fields[#fields + 1] = ARGV[index]
end
redis.call("HSET", KEYS[1], "sequence", sequence, "status", "queued", "attempt", 0, unpack(fields))
redis.call("ZADD", KEYS[2], sequence, ARGV[1])
redis.call("SADD", KEYS[3], ARGV[1])
redis.call("HINCRBY", KEYS[6], "queued", 1)
redis.call("XADD", KEYS[5], "*", "job", ARGV[1])
if KEYS[7] ~= "" then
  redis.call("SET", KEYS[7], ARGV[3], "EX", ARGV[4])
end
return {1, sequence}
