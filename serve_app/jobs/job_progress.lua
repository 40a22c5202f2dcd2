-- Record a running attempt's progress; a stale attempt (the job was redelivered) writes nothing.
--
-- KEYS[1] the job hash
-- ARGV[1] attempt  ARGV[2..] field, value pairs
--
-- Returns 1 when written, 0 when the attempt is no longer the job's current running one.

if redis.call("HGET", KEYS[1], "status") ~= "running" or redis.call("HGET", KEYS[1], "attempt") ~= ARGV[1] then
  return 0
end
local fields = {}
for index = 2, #ARGV do
  fields[#fields + 1] = ARGV[index]
end
redis.call("HSET", KEYS[1], unpack(fields))
return 1
