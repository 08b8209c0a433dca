-- Discord's invalid-request budget, shared by every gateway of one host.
--
-- Discord bans an IP for a while once it has sent 10,000 invalid requests
-- (401, 403, 429 except scope `shared`) in 10 minutes, whatever the tokens.
-- So the count is per host (KEYS[1] = `sg:{discord-host:<host>}:invalid`, a
-- key of its own slot), over a sliding window: a sorted set of one member
-- per invalid request, scored by the Redis server's time in ms.
--
-- ARGV[1] = mode: check | count; ARGV[2] = limit; ARGV[3] = window ms.
-- check -> {1, 0} when under the limit, else {0, ms until the oldest
--          counted request leaves the window}.
-- count -> {requests in the window, 0} after counting one more.

local key = KEYS[1]
local mode = ARGV[1]
local limit = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
if mode == 'check' then
  local n = redis.call('ZCARD', key)
  if n < limit then
    return {1, 0}
  end
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  local wait = tonumber(oldest[2]) + window - now
  if wait < 1 then
    wait = 1
  end
  return {0, wait}
elseif mode == 'count' then
  -- ARGV[4]: a random id, so members stay unique within one millisecond.
  redis.call('ZADD', key, now, now .. '-' .. ARGV[4])
  redis.call('PEXPIRE', key, window + 60000)
  return {redis.call('ZCARD', key), 0}
end
return redis.error_reply('unknown mode ' .. tostring(mode))
