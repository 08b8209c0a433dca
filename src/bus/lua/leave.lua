-- A gateway leaving (shutdown): unregister, so peers claim what it leaves
-- pending at once. Only the registered instance may leave.
-- KEYS: nodes, beats   ARGV: consumer, instance
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
