-- The Matrix syncer's lease. KEYS[1] lease; ARGV[1] owner, ARGV[2] ttl in
-- ms, ARGV[3] 'take' (if free, or renew if ours), 'renew' (only if ours) or
-- 'release' (delete if ours). Returns 1 when the lease is (was) ours, else 0.
local v = redis.call('GET', KEYS[1])
if ARGV[3] == 'release' then
  if v == ARGV[1] then
    redis.call('DEL', KEYS[1])
    return 1
  end
  return 0
end
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not v and ARGV[3] == 'take' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
