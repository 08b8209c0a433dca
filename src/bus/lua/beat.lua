-- Heartbeat of one instance, and what its liveness loop needs to judge the
-- others: every registered node, every beat counter, and the consumers that
-- have pending entries.
-- KEYS: nodes, beats, stream   ARGV: consumer, instance, group
-- Returns {'lost'} when the instance is no longer registered, else
-- {'ok', nodes (flat), beats (flat), pending consumers ([[name, count], …])}.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return {'lost'} end
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
local pend = redis.pcall('XPENDING', KEYS[3], ARGV[3])
local consumers = {}
if type(pend) == 'table' and type(pend[4]) == 'table' then consumers = pend[4] end
return {'ok', redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]), consumers}
