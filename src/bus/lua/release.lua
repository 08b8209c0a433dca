-- Give a channel up if it is still ours (its token stays, and grows on the
-- next take).
-- KEYS: chan   ARGV: instance
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'owner', 'gap_seq', 'gap_since')
redis.call('PEXPIRE', KEYS[1], IDLE_EXPIRY_MS)
return 1
