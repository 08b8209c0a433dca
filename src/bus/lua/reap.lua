-- Forget a dead consumer of the group once nothing is pending for it (an
-- atomic check, so no entry it still holds can vanish with it).
-- KEYS: stream, nodes   ARGV: group, consumer
if redis.call('HGET', KEYS[2], ARGV[2]) then return 0 end
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
