-- Discord rate limits shared by every gateway using one bot token.
--
-- KEYS[1] = the platform's Discord key base, `sg:{P}:discord:` (every key
-- below starts with it, so all share the platform's hash tag / cluster slot).
-- ARGV[1] = mode: acquire | update | limited | invalid.
-- Time is the Redis server's (TIME), so every gateway sees one clock.
--
-- Keys under the base:
--   route:<route>              -> the bucket hash Discord named for the route
--   bucket:<hash>:<major>      -> hash {remaining, reset_at, limit, period}
--   bucket:r:<route>:<major>   -> the same, while the bucket hash is unknown
--   global:<unix second>       -> requests counted in that second (all routes)
--   global_until               -> ms until which a global 429 stops everything
--   auth:refused               -> why Discord refused the bot token (a 401):
--                                 while set, no gateway sends (probes aside)
--
-- The invalid-request budget is per host, not per token: see invalid.lua.
--
-- Every mode returns {n, wait_ms, why}.

local base = KEYS[1]
local mode = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function bucket_key(route, major)
  local hash = redis.call('GET', base .. 'route:' .. route)
  if hash then
    return base .. 'bucket:' .. hash .. ':' .. major
  end
  return base .. 'bucket:r:' .. route .. ':' .. major
end

if mode == 'acquire' then
  -- ARGV: route, major, global limit per second, boundary ms, probe ('1':
  -- the request checks a refused token, so the refusal does not stop it).
  -- Check every limit, then take one permit of each, in one step.
  local route, major = ARGV[2], ARGV[3]
  local global_limit = tonumber(ARGV[4])
  if ARGV[6] ~= '1' then
    local refused = redis.call('GET', base .. 'auth:refused')
    if refused then
      return {0, 0, 'unauthorized:' .. refused}
    end
  end
  local blocked = tonumber(redis.call('GET', base .. 'global_until') or '0')
  if blocked > now then
    return {0, blocked - now, 'global_429'}
  end
  local bkey = bucket_key(route, major)
  local b = redis.call('HMGET', bkey, 'remaining', 'reset_at', 'limit', 'period')
  local remaining, reset_at = tonumber(b[1]), tonumber(b[2])
  local limit, period = tonumber(b[3]), tonumber(b[4])
  local current = reset_at ~= nil and reset_at > now
  if current and remaining ~= nil and remaining <= 0 then
    return {0, reset_at - now, 'bucket'}
  end
  local sec = math.floor(now / 1000)
  local gkey = base .. 'global:' .. sec
  local used = tonumber(redis.call('GET', gkey) or '0')
  if used >= global_limit then
    return {0, (sec + 1) * 1000 - now, 'global'}
  end
  -- A request taken in the last `boundary` ms of a second may reach Discord
  -- in the next one: count it in both.
  local boundary = tonumber(ARGV[5])
  if now % 1000 >= 1000 - boundary then
    local nkey = base .. 'global:' .. (sec + 1)
    if tonumber(redis.call('GET', nkey) or '0') >= global_limit then
      return {0, (sec + 2) * 1000 - now, 'global'}
    end
    redis.call('INCR', nkey)
    redis.call('PEXPIRE', nkey, 5000)
  end
  redis.call('INCR', gkey)
  redis.call('PEXPIRE', gkey, 5000)
  if current then
    redis.call('HINCRBY', bkey, 'remaining', -1)
  elseif limit ~= nil and period ~= nil then
    -- The window has rolled: assume a fresh one until Discord's headers say.
    redis.call('HSET', bkey, 'remaining', limit - 1, 'reset_at', now + period)
    redis.call('PEXPIRE', bkey, period + 60000)
  end
  return {1, 0, 'ok'}
elseif mode == 'update' then
  -- ARGV: route, major, bucket hash ('' when none), limit, remaining, reset_after_ms.
  local route, major, hash = ARGV[2], ARGV[3], ARGV[4]
  local limit = tonumber(ARGV[5])
  local remaining = tonumber(ARGV[6])
  local after = tonumber(ARGV[7])
  local bkey
  if hash ~= '' then
    redis.call('SET', base .. 'route:' .. route, hash, 'PX', 86400000)
    bkey = base .. 'bucket:' .. hash .. ':' .. major
  else
    bkey = base .. 'bucket:r:' .. route .. ':' .. major
  end
  local reset_at = now + after
  local b = redis.call('HMGET', bkey, 'remaining', 'reset_at', 'period')
  local old_rem, old_reset, old_period = tonumber(b[1]), tonumber(b[2]), tonumber(b[3])
  if old_reset ~= nil and old_reset > now and math.abs(old_reset - reset_at) < 1000 then
    -- The same window: permits taken by requests still in flight stay taken.
    if old_rem ~= nil and old_rem < remaining then
      remaining = old_rem
    end
    if old_reset > reset_at then
      reset_at = old_reset
    end
  end
  local period = after
  if old_period ~= nil and old_period > period then
    period = old_period
  end
  redis.call('HSET', bkey, 'remaining', remaining, 'reset_at', reset_at, 'limit', limit, 'period', period)
  redis.call('PEXPIRE', bkey, period + 60000)
  return {1, 0, 'ok'}
elseif mode == 'limited' then
  -- ARGV: route, major, retry_after_ms, global ('1' or '0').
  local after = tonumber(ARGV[4])
  if ARGV[5] == '1' then
    local untill = now + after
    local cur = tonumber(redis.call('GET', base .. 'global_until') or '0')
    if untill > cur then
      redis.call('SET', base .. 'global_until', untill, 'PX', after + 1000)
    end
  else
    local bkey = bucket_key(ARGV[2], ARGV[3])
    redis.call('HSET', bkey, 'remaining', 0, 'reset_at', now + after)
    redis.call('PEXPIRE', bkey, after + 60000)
  end
  return {1, after, 'limited'}
elseif mode == 'refused' then
  -- ARGV: why. Kept a day at most: a gateway that starts later probes anew.
  redis.call('SET', base .. 'auth:refused', ARGV[2], 'PX', 86400000)
  return {1, 0, 'refused'}
elseif mode == 'accepted' then
  return {redis.call('DEL', base .. 'auth:refused'), 0, 'accepted'}
end
return redis.error_reply('unknown mode ' .. tostring(mode))
