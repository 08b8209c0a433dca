-- Shared by every Stargazer script (concatenated in front of each at build time).
--
-- Channel state hash (one per platform channel, KEYS[1] of every script):
--   seq           producers' counter (HINCRBY); never touched here
--   done          highest seq that is finished (delivered, skipped or dead-lettered)
--   owner         instance holding the channel lock ("<consumer>/<instance>")
--   token         fencing token; grows by one every time the lock changes hands
--   lease         server time (ms) until which the lock is held
--   inflight      stream id whose send has begun and not yet been committed
--   attempts      attempts used by the in-flight entry (kept across redeliveries)
--   unk:<id>      attempts of an entry whose sender vanished mid-send (outcome unknown)
--   gap_seq       the seq the gate is waiting for; gap_since: server ms it began waiting

local IDLE_EXPIRY_MS = 30 * 24 * 3600 * 1000
local CACHE_EXPIRY_S = 90 * 24 * 3600

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- true while the lock is held by `me` with fencing token `token`
local function holds(chan, me, token)
  local f = redis.call('HMGET', chan, 'owner', 'token')
  return f[1] == me and f[2] == token
end

-- Is stream entry `id` still pending in the group, and for which consumer?
local function pending_owner(stream, group, id)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if #p == 0 then return false end
  return p[1][2]
end

-- Try to begin the send of entry `id` (optionally numbered `seq`) for consumer
-- `consumer` running as instance `me`. Returns one of:
--   {'go', token, attempts, resumed, gap_skipped, late}
--   {'busy', wait_ms}       another live instance holds the channel
--   {'gap', wait_ms}        an earlier seq has not finished yet
--   {'done'}                the entry is no longer pending: it was finished before
--   {'moved', owner}        the entry now belongs to another consumer
local function begin_entry(chan, stream, group, cache, me, consumer, id, seq, ttl, gap_timeout)
  local owner_c = pending_owner(stream, group, id)
  if not owner_c then return {'done'} end
  if owner_c ~= consumer then return {'moved', owner_c} end

  local now = now_ms()
  local f = redis.call('HMGET', chan, 'owner', 'token', 'lease', 'done', 'inflight', 'attempts', 'gap_seq', 'gap_since')
  local owner, token, lease = f[1], f[2], tonumber(f[3] or '0')
  if owner and owner ~= me and lease > now then
    return {'busy', lease - now}
  end

  local gap_skipped, late = 0, 0
  if seq ~= '' then
    local s = tonumber(seq)
    local done = tonumber(f[4] or '0')
    if s <= done then
      -- still pending yet numbered at or below the mark: its gap was skipped
      -- (or the producer reused a number). Deliver it rather than lose it.
      late = 1
    elseif s > done + 1 then
      local want = tostring(done + 1)
      if f[7] ~= want then
        redis.call('HSET', chan, 'gap_seq', want, 'gap_since', now)
        redis.call('PEXPIRE', chan, IDLE_EXPIRY_MS)
        return {'gap', gap_timeout}
      end
      local waited = now - tonumber(f[8])
      if waited < gap_timeout then return {'gap', gap_timeout - waited} end
      gap_skipped = s - 1 - done
      redis.call('HSET', chan, 'done', s - 1)
      redis.call('HDEL', chan, 'gap_seq', 'gap_since')
    end
  end

  local attempts, resumed = tonumber(f[6] or '0'), 0
  local inflight = f[5]
  if inflight and inflight ~= id then
    -- a sender vanished while sending another entry: remember that entry's
    -- outcome is unknown, so it is treated as such when it is recovered
    redis.call('HSET', chan, 'unk:' .. inflight, attempts)
    attempts = 0
  end
  if inflight == id then
    resumed = 1
  else
    local u = redis.call('HGET', chan, 'unk:' .. id)
    if u then
      resumed, attempts = 1, tonumber(u)
      redis.call('HDEL', chan, 'unk:' .. id)
    else
      attempts = 0
    end
  end

  if cache ~= '' and resumed == 0 and redis.call('HEXISTS', cache, 'message_id') == 1 then
    -- the message cache already holds a platform id for this message_key
    resumed = 2
  end

  if owner ~= me then
    token = tostring(redis.call('HINCRBY', chan, 'token', 1))
  end
  redis.call('HSET', chan, 'owner', me, 'lease', now + ttl, 'inflight', id, 'attempts', attempts)
  if f[7] and gap_skipped == 0 and seq ~= '' and tonumber(seq) == tonumber(f[7]) then
    redis.call('HDEL', chan, 'gap_seq', 'gap_since')
  end
  redis.call('PEXPIRE', chan, IDLE_EXPIRY_MS)
  return {'go', token, attempts, resumed, gap_skipped, late}
end

-- Finish entry `id`: advance the delivered mark, clear the in-flight record,
-- acknowledge. Caller has checked the fencing token.
local function finish_entry(chan, stream, group, id, seq, release, ttl)
  if seq ~= '' then
    local s = tonumber(seq)
    local done = tonumber(redis.call('HGET', chan, 'done') or '0')
    if s > done then redis.call('HSET', chan, 'done', s) end
  end
  redis.call('HDEL', chan, 'inflight', 'attempts')
  redis.call('XACK', stream, group, id)
  if release == '1' then
    redis.call('HDEL', chan, 'owner', 'lease')
  else
    redis.call('HSET', chan, 'lease', now_ms() + ttl)
  end
  redis.call('PEXPIRE', chan, IDLE_EXPIRY_MS)
end
