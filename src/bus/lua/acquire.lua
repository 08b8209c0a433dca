-- Take a channel (or find who owns it).
-- KEYS: chan, nodes   ARGV: instance
-- Returns {'lost'} when this instance is no longer registered;
-- {'peer', owner} when a live peer owns the channel;
-- {'mine', token, done} otherwise — taking it over (token + 1) unless it
-- was already ours.
if not live(KEYS[2], ARGV[1]) then return {'lost'} end
local f = redis.call('HMGET', KEYS[1], 'owner', 'token', 'done')
local owner, token = f[1], f[2] or '0'
if owner and owner ~= ARGV[1] and live(KEYS[2], owner) then return {'peer', owner} end
if owner ~= ARGV[1] then
  token = string.format('%d', tonumber(token) + 1)
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', token)
end
redis.call('PEXPIRE', KEYS[1], IDLE_EXPIRY_MS)
return {'mine', token, f[3] or '0'}
