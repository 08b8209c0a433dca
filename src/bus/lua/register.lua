-- Register a gateway instance (replacing any earlier instance of the same
-- consumer name, which is thereby dead) and forget its stale inbox.
-- KEYS: nodes, beats, inbox   ARGV: consumer, instance
-- Returns the instance it replaced, or false.
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('DEL', KEYS[3])
return old
