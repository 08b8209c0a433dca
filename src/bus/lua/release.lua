-- Give the channel lock up if it is still ours. The in-flight record stays:
-- an interrupted send is recognised as such by the next holder.
-- KEYS: chan   ARGV: me, token
if not holds(KEYS[1], ARGV[1], ARGV[2]) then return 0 end
redis.call('HDEL', KEYS[1], 'owner', 'lease')
if redis.call('HGET', KEYS[1], 'wake') == '1' then
  redis.call('HDEL', KEYS[1], 'wake')
  redis.call('PUBLISH', KEYS[1], 'w')
end
return 1
