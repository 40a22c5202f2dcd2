-- Begin an attempt at a job taken from the stream: queued or running (a redelivery) -> running.
--
-- KEYS[1] the job hash  KEYS[2] the jobs-by-state counters  KEYS[3] the owner's running set
-- ARGV[1] consumer name  ARGV[2] now (epoch s)  ARGV[3] most attempts  ARGV[4] job id
-- ARGV[5] most jobs one owner may have running at once
--
-- Returns {"gone"} (expired or deleted), {"done", status} (terminal already: acknowledge it),
-- {"deferred"} (its owner already runs its share: the caller queues it again, behind others'),
-- {"exhausted", attempt} (too many attempts: the caller fails it), or {"started", attempt}.

local status = redis.call("HGET", KEYS[1], "status")
if not status then
  return {"gone"}
end
if status ~= "queued" and status ~= "running" then
  return {"done", status}
end
if status == "queued" and redis.call("SISMEMBER", KEYS[3], ARGV[4]) == 0
   and redis.call("SCARD", KEYS[3]) >= tonumber(ARGV[5]) then
  return {"deferred"}
end
redis.call("SADD", KEYS[3], ARGV[4])
local attempt = redis.call("HINCRBY", KEYS[1], "attempt", 1)
if status == "queued" then
  redis.call("HINCRBY", KEYS[2], "queued", -1)
  redis.call("HINCRBY", KEYS[2], "running", 1)
  redis.call("HSET", KEYS[1], "status", "running", "started_at", ARGV[2])
end
redis.call("HSET", KEYS[1], "runner", ARGV[1])
if attempt > tonumber(ARGV[3]) then
  return {"exhausted", attempt}
end
return {"started", attempt}
