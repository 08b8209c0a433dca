-- One write of a Matrix platform's crypto store, fenced by the crypto lock.
-- KEYS: lock, generation, then the store's keys in slot order (all under
-- sg:{P}:matrix:crypto:, one hash slot).
-- ARGV[1] the lock token of the writer, ARGV[2] JSON [[slot, op, field,
-- value], ...] with op hset | hdel | set | sadd (slot = 1-based KEYS index).
-- Returns the new generation, or -1 (nothing written) when the lock is not
-- the writer's.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
for _, o in ipairs(cjson.decode(ARGV[2])) do
  local key = KEYS[o[1]]
  if o[2] == 'hset' then
    redis.call('HSET', key, o[3], o[4])
  elseif o[2] == 'hdel' then
    redis.call('HDEL', key, o[3])
  elseif o[2] == 'set' then
    redis.call('SET', key, o[4])
  elseif o[2] == 'sadd' then
    redis.call('SADD', key, o[3])
  end
end
return redis.call('INCR', KEYS[2])
