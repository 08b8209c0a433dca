-- Declare a node dead, if it is still the instance and beat that was watched
-- standing still (a beat since then means it lives). Its inbox goes too.
-- KEYS: nodes, beats, inbox   ARGV: consumer, instance, beat
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if (redis.call('HGET', KEYS[2], ARGV[1]) or '') ~= ARGV[3] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
