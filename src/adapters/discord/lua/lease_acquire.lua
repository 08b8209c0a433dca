-- The session lease: take it (SET NX PX) or extend it when already ours.
-- KEYS[1] = lease; ARGV[1] = owner, ARGV[2] = ttl ms. Returns 1 when held.
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
  return 1
elseif v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
