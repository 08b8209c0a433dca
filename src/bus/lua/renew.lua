-- Extend the channel lock while it is ours; optionally count a used attempt.
-- Also re-arms the channel hash's idle expiry (a long send keeps it alive).
-- KEYS: chan   ARGV: me, token, lock_ttl_ms, attempt_used ('1' or '0')
-- Returns the in-flight entry's attempts, or -1 when the lock is no longer ours.
local chan, me, token = KEYS[1], ARGV[1], ARGV[2]
local f = redis.call('HMGET', chan, 'owner', 'token', 'attempts')
if f[1] ~= me or f[2] ~= token then return -1 end
redis.call('HSET', chan, 'lease', int(now_ms() + tonumber(ARGV[3])))
redis.call('PEXPIRE', chan, IDLE_EXPIRY_MS)
if ARGV[4] == '1' then return redis.call('HINCRBY', chan, 'attempts', 1) end
return tonumber(f[3] or '0')
