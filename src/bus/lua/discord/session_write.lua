-- Replace the stored session, fenced by the lease.
-- KEYS: lease, session. ARGV: owner, then field/value pairs (none: delete the session).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
for i = 2, #ARGV - 1, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
return 1
