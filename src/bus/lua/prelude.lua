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
--
-- Cost rules (Redis runs these for every message): a script reads the channel
-- hash once (`load`, one HMGET), keeps its changes in `st.w` and writes them
-- with at most one HSET and one HDEL (`flush`); numbers handed to redis.call
-- are formatted as integers here (`int`) or passed on as the strings they came
-- as, never as Lua numbers (which Redis would format with "%.17g").

local IDLE_EXPIRY_MS = '2592000000' -- 30 days
local IDLE_REFRESH_MS = 3600000 -- a lock held without a break re-arms the expiry hourly
local CACHE_EXPIRY_S = '7776000' -- 90 days

local function int(n)
  return string.format('%d', n)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- true while the lock is held by `me` with fencing token `token`
local function holds(chan, me, token)
  local f = redis.call('HMGET', chan, 'owner', 'token')
  return f[1] == me and f[2] == token
end

-- The channel state, read with one HMGET (plus the `unk:<id>` field of the
-- entry about to begin, if any). Missing fields are false.
local function load(chan, unk_field)
  local f
  if unk_field then
    f = redis.call('HMGET', chan, 'owner', 'token', 'lease', 'done', 'inflight', 'attempts',
      'gap_seq', 'gap_since', unk_field)
  else
    f = redis.call('HMGET', chan, 'owner', 'token', 'lease', 'done', 'inflight', 'attempts',
      'gap_seq', 'gap_since')
  end
  return {owner = f[1], token = f[2], lease = f[3], lease0 = f[3], done = f[4], inflight = f[5],
    attempts = f[6], gap_seq = f[7], gap_since = f[8], unk = f[9], w = {}, expire = false}
end

-- Record a change (false deletes the field); `flush` writes them all.
local function put(st, field, value)
  st.w[field] = value
  st[field] = value
end

local function flush(chan, st)
  local sets, dels = {}, {}
  for k, v in pairs(st.w) do
    if v then
      sets[#sets + 1] = k
      sets[#sets + 1] = v
    else
      dels[#dels + 1] = k
    end
  end
  if #sets > 0 then redis.call('HSET', chan, unpack(sets)) end
  if #dels > 0 then redis.call('HDEL', chan, unpack(dels)) end
  if st.expire then redis.call('PEXPIRE', chan, IDLE_EXPIRY_MS) end
end

-- Try to begin the send of entry `id` (optionally numbered `seq`) for consumer
-- `consumer` running as instance `me`, on the channel state `st` (see `load`;
-- its `unk` must be the `unk:<id>` field). The caller flushes `st`. Returns one of:
--   {'go', token, attempts, resumed, gap_skipped, late}
--   {'busy', wait_ms}       another live instance holds the channel
--   {'gap', wait_ms}        an earlier seq has not finished yet
--   {'done'}                the entry is no longer pending: it was finished before
--   {'moved', owner}        the entry now belongs to another consumer
local function begin_entry(st, stream, group, cache, me, consumer, id, seq, ttl, gap_timeout, now)
  -- Is the entry still pending in the group, and for us?
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if #p == 0 then return {'done'} end
  if p[1][2] ~= consumer then return {'moved', p[1][2]} end

  local owner, lease = st.owner, tonumber(st.lease or '0')
  if owner and owner ~= me and lease > now then
    return {'busy', lease - now}
  end

  local gap_skipped, late = 0, 0
  if seq ~= '' then
    local s = tonumber(seq)
    local done = tonumber(st.done or '0')
    if s <= done then
      -- still pending yet numbered at or below the mark: its gap was skipped
      -- (or the producer reused a number). Deliver it rather than lose it.
      late = 1
    elseif s > done + 1 then
      local want = int(done + 1)
      if st.gap_seq ~= want then
        put(st, 'gap_seq', want)
        put(st, 'gap_since', int(now))
        st.expire = true
        return {'gap', gap_timeout}
      end
      local waited = now - tonumber(st.gap_since)
      if waited < gap_timeout then return {'gap', gap_timeout - waited} end
      gap_skipped = s - 1 - done
      put(st, 'done', int(s - 1))
      put(st, 'gap_seq', false)
      put(st, 'gap_since', false)
    end
  end

  local attempts, resumed = st.attempts or '0', 0
  local inflight = st.inflight
  if inflight and inflight ~= id then
    -- a sender vanished while sending another entry: remember that entry's
    -- outcome is unknown, so it is treated as such when it is recovered
    put(st, 'unk:' .. inflight, attempts)
    attempts = '0'
  end
  if inflight == id then
    resumed = 1
  elseif st.unk then
    resumed, attempts = 1, st.unk
    put(st, 'unk:' .. id, false)
  else
    attempts = '0'
  end

  if cache ~= '' and resumed == 0 and redis.call('HEXISTS', cache, 'message_id') == 1 then
    -- the message cache already holds a platform id for this message_key
    resumed = 2
  end

  local token = st.token
  if owner ~= me then
    token = int(tonumber(st.token or '0') + 1)
    put(st, 'token', token)
    put(st, 'owner', me)
    st.expire = true
  elseif math.floor((tonumber(st.lease0 or '0') - ttl) / IDLE_REFRESH_MS) ~= math.floor(now / IDLE_REFRESH_MS) then
    st.expire = true
  end
  put(st, 'lease', int(now + ttl))
  put(st, 'inflight', id)
  put(st, 'attempts', attempts)
  if st.gap_seq and gap_skipped == 0 and seq ~= '' and tonumber(seq) == tonumber(st.gap_seq) then
    put(st, 'gap_seq', false)
    put(st, 'gap_since', false)
  end
  return {'go', token, attempts, resumed, gap_skipped, late}
end

-- Finish entry `id` on the channel state `st`: advance the delivered mark,
-- clear the in-flight record, acknowledge. Caller has checked the fencing
-- token and flushes `st`; `now` is needed only when the lock is kept.
local function finish_entry(st, stream, group, id, seq, release, ttl, now)
  if seq ~= '' and tonumber(seq) > tonumber(st.done or '0') then put(st, 'done', seq) end
  put(st, 'inflight', false)
  put(st, 'attempts', false)
  redis.call('XACK', stream, group, id)
  if release == '1' then
    put(st, 'owner', false)
    put(st, 'lease', false)
  else
    put(st, 'lease', int(now + ttl))
  end
end
