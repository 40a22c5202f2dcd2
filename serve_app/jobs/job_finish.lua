-- End a job in its one terminal state: succeeded, failed or cancelled.
--
-- KEYS[1] the job hash  KEYS[2] the result  KEYS[3] the owner's active set
-- KEYS[4] the jobs-by-state counters  KEYS[5] the expiry index (sorted set: expires_at -> id)
-- KEYS[6] the owner's running set
-- ARGV[1] job id  ARGV[2] terminal status  ARGV[3] attempt that must be current, or "" for any
--         (cancellation)  ARGV[4] now (epoch s)  ARGV[5] result, or ""  ARGV[6] error problem
--         JSON, or ""  ARGV[7] hard TTL (s) of the keys, past their expiry (a backstop when no
--         runner sweeps)
--
-- Returns {1, previous status} when this call ended the job, {0, status} when it was already
-- terminal or the attempt is stale (nothing written).

local status = redis.call("HGET", KEYS[1], "status")
if status ~= "queued" and status ~= "running" then
  return {0, status or "gone"}
end
if ARGV[3] ~= "" and (status ~= "running" or redis.call("HGET", KEYS[1], "attempt") ~= ARGV[3]) then
  return {0, status}
end
local retain = tonumber(redis.call("HGET", KEYS[1], "retain_s"))
local expires_at = tonumber(ARGV[4]) + retain
redis.call("HSET", KEYS[1], "status", ARGV[2], "finished_at", ARGV[4], "expires_at", expires_at)
if ARGV[6] ~= "" then
  redis.call("HSET", KEYS[1], "error", ARGV[6])
end
if ARGV[5] ~= "" then
  redis.call("SET", KEYS[2], ARGV[5])
end
redis.call("HDEL", KEYS[1], "transcript")  -- the job no longer needs it
redis.call("SREM", KEYS[3], ARGV[1])
redis.call("SREM", KEYS[6], ARGV[1])
redis.call("HINCRBY", KEYS[4], status, -1)
redis.call("ZADD", KEYS[5], expires_at, ARGV[1])
local ttl = math.ceil(retain + tonumber(ARGV[7]))
redis.call("EXPIRE", KEYS[1], ttl)
redis.call("EXPIRE", KEYS[2], ttl)
return {1, status}
