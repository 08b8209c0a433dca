-- Shards leased across the fleet: register this gateway as live, work out
-- its fair share, and take free shards up to it.
--
-- KEYS[1] = the live gateways (a sorted set: owner -> expiry ms, Redis time);
-- KEYS[2..n+1] = the lease of shard 0..n-1 (value: the holder's owner name).
-- ARGV[1] = owner, ARGV[2] = lease ttl ms, ARGV[3] = '1' to take free shards
-- ('0': only report, e.g. while the token is refused; such a gateway does not
-- count as live, so the others' shares leave it nothing to wait for).
--
-- share = ceil(n / live gateways). Returns {held, excess, live}: the shards
-- this owner holds after the call (taken ones included) and, when it holds
-- more than its share, the highest ones it should hand over (release), so
-- 3 shards over 2 gateways settle as 2 + 1.
local owner, ttl = ARGV[1], tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], now + ttl, owner)
else
  redis.call('ZREM', KEYS[1], owner)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ttl * 4)
local live = math.max(redis.call('ZCARD', KEYS[1]), 1)
local n = #KEYS - 1
local share = math.floor((n + live - 1) / live)
local held = {}
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == owner then
    held[#held + 1] = i - 2
  end
end
local excess = {}
if #held > share then
  for j = share + 1, #held do
    excess[#excess + 1] = held[j]
  end
elseif ARGV[3] == '1' then
  local want = share - #held
  for i = 2, #KEYS do
    if want <= 0 then break end
    if redis.call('SET', KEYS[i], owner, 'NX', 'PX', ttl) then
      held[#held + 1] = i - 2
      want = want - 1
    end
  end
  table.sort(held)
end
return {held, excess, live}
