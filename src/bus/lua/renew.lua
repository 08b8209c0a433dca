-- Extend the channel lock while it is ours; optionally count a used attempt.
-- KEYS: chan   ARGV: me, token, lock_ttl_ms, attempt_used ('1' or '0')
-- Returns the in-flight entry's attempts, or -1 when the lock is no longer ours.
local chan, me, token = KEYS[1], ARGV[1], ARGV[2]
if not holds(chan, me, token) then return -1 end
redis.call('HSET', chan, 'lease', now_ms() + tonumber(ARGV[3]))
if ARGV[4] == '1' then return redis.call('HINCRBY', chan, 'attempts', 1) end
return tonumber(redis.call('HGET', chan, 'attempts') or '0')
