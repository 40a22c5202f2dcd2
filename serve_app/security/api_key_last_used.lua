-- Record an API key's last use, written behind by ApiKeyStore.flush_last_used.
-- KEYS[1]: the key's record hash; ARGV[1]: the use time (Unix seconds).
-- Keeps the newest time when several replicas flush the same key, and never recreates a record
-- that does not exist.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local current = tonumber(redis.call('HGET', KEYS[1], 'last_used_at') or '0')
if tonumber(ARGV[1]) > current then redis.call('HSET', KEYS[1], 'last_used_at', ARGV[1]) end
return 1
