-- The fleet's shard count, changed only from the value the caller saw, so
-- two gateways that both met close 4011 reshard once, not twice.
-- KEYS[1] = the shards hash (count, max_concurrency).
-- ARGV[1] = the count the caller saw ('' = none yet), ARGV[2] = the new
-- count, ARGV[3] = max_concurrency ('' = leave).
-- Returns the count in force after the call.
local cur = redis.call('HGET', KEYS[1], 'count')
if (cur or '') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'count', ARGV[2])
  cur = ARGV[2]
end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'max_concurrency', ARGV[3])
end
return tonumber(cur)
