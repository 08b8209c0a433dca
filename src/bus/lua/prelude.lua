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
--   wake          '1' while a lane waits on this channel: the next commit,
--                 dead-letter or release PUBLISHes on this key and clears it
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

-- Server time, read once per script call: every step of a batch runs in the
-- same atomic call, so they share one instant (leases end no later than if
-- each step had read the clock itself).
local now_cached = nil
local function now_ms()
  if not now_cached then
    local t = redis.call('TIME')
    now_cached = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now_cached
end

-- Acknowledgements are gathered and sent with one XACK per stream at the end
-- of the script call (`flush_acks`); `acked` answers for ids acknowledged
-- earlier in the same call, which are no longer pending. A batch step that
-- fails takes its acknowledgements back (`drop_acks`) along with its other
-- writes, which are only made at its end (`flush`).
local acks, acked = {}, {}
local function ack(stream, group, id)
  acks[#acks + 1] = {stream, group, id}
  acked[stream .. '\0' .. group .. '\0' .. id] = true
end

local function drop_acks(n)
  for i = #acks, n + 1, -1 do
    local a = acks[i]
    acked[a[1] .. '\0' .. a[2] .. '\0' .. a[3]] = nil
    acks[i] = nil
  end
end

local function flush_acks()
  local by, order = {}, {}
  for _, a in ipairs(acks) do
    local k = a[1] .. '\0' .. a[2]
    local b = by[k]
    if not b then
      b = {a[1], a[2]}
      by[k] = b
      order[#order + 1] = b
    end
    b[#b + 1] = a[3]
  end
  for _, b in ipairs(order) do redis.call('XACK', unpack(b)) end
  acks, acked = {}, {}
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
      'gap_seq', 'gap_since', 'wake', unk_field)
  else
    f = redis.call('HMGET', chan, 'owner', 'token', 'lease', 'done', 'inflight', 'attempts',
      'gap_seq', 'gap_since', 'wake')
  end
  return {chan = chan, owner = f[1], token = f[2], lease = f[3], lease0 = f[3], done = f[4],
    inflight = f[5], attempts = f[6], gap_seq = f[7], gap_since = f[8], wake = f[9], unk = f[10],
    w = {}, expire = false}
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
-- A lane is about to wait on this channel (lock or predecessor): mark it, so
-- the next commit, dead-letter or release publishes a wake-up on the
-- channel's key instead of leaving the waiter to its poll.
local function wait_here(st)
  if st.wake ~= '1' then put(st, 'wake', '1') end
end

local function wake_waiters(st)
  if st.wake == '1' then
    put(st, 'wake', false)
    redis.call('PUBLISH', st.chan, 'w')
  end
end

local function begin_entry(st, stream, group, cache, me, consumer, id, seq, ttl, gap_timeout, now)
  -- Is the entry still pending in the group, and for us?
  if acked[stream .. '\0' .. group .. '\0' .. id] then return {'done'} end
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if #p == 0 then return {'done'} end
  if p[1][2] ~= consumer then return {'moved', p[1][2]} end

  local owner, lease = st.owner, tonumber(st.lease or '0')
  if owner and owner ~= me and lease > now then
    wait_here(st)
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
        wait_here(st)
        return {'gap', gap_timeout}
      end
      local waited = now - tonumber(st.gap_since)
      if waited < gap_timeout then
        wait_here(st)
        return {'gap', gap_timeout - waited}
      end
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

  -- pcall: a message_key holding another type (a producer's mistake) must not
  -- wedge the channel; it is treated as holding no platform id.
  if cache ~= '' and resumed == 0 and redis.pcall('HEXISTS', cache, 'message_id') == 1 then
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
  ack(stream, group, id)
  if release == '1' then
    put(st, 'owner', false)
    put(st, 'lease', false)
  else
    put(st, 'lease', int(now + ttl))
  end
  wake_waiters(st)
end

-- The begin script (begin.lua) as a function, so a batch can run it too: its
-- keys are K[ko + 1 ...], its args A[ao + 1 ...].
-- KEYS: chan, stream, cache (the message_key, or chan when there is none)
-- ARGV: group, me, consumer, id, seq, lock_ttl_ms, gap_timeout_ms, has_cache
local function begin_op(K, ko, A, ao)
  local cache = ''
  if A[ao + 8] == '1' then cache = K[ko + 3] end
  local st = load(K[ko + 1], 'unk:' .. A[ao + 4])
  local r = begin_entry(st, K[ko + 2], A[ao + 1], cache, A[ao + 2], A[ao + 3], A[ao + 4], A[ao + 5],
    tonumber(A[ao + 6]), tonumber(A[ao + 7]), now_ms())
  flush(K[ko + 1], st)
  return r
end

-- The commit script (commit.lua) as a function, so a batch can run it too
-- (keys K[ko + 1 ...], args A[ao + 1 ...]).
-- Commit a finished delivery and, optionally, begin the next entry of the same
-- channel in the same round trip.
-- KEYS: chan, stream, cache (message_key or chan), next_cache (or chan)
-- ARGV: group, me, token, id, seq, message_id, release, lock_ttl_ms,
--       next_id, next_seq, consumer, gap_timeout_ms, next_has_cache
-- Returns {'stale'} when the fencing token is no longer ours (nothing written),
-- else {'ok'} or {'ok', <begin result of the next entry>...}.
local function commit_op(K, ko, A, ao)
  local chan, stream, group, me, token = K[ko + 1], K[ko + 2], A[ao + 1], A[ao + 2], A[ao + 3]
  local next_id = A[ao + 9]
  local unk_field = nil
  if next_id ~= '' then unk_field = 'unk:' .. next_id end
  local st = load(chan, unk_field)
  if st.owner ~= me or st.token ~= token then return {'stale'} end
  local ttl = tonumber(A[ao + 8])
  local now = 0
  if A[ao + 7] ~= '1' or next_id ~= '' then now = now_ms() end
  finish_entry(st, stream, group, A[ao + 4], A[ao + 5], A[ao + 7], ttl, now)
  if A[ao + 6] ~= '' and K[ko + 3] ~= chan then
    -- A message_key holding another type keeps its value: the delivery
    -- stands, only the write-back is skipped (pcall instead of an error that
    -- would make the commit fail again and again).
    local existed = redis.call('EXISTS', K[ko + 3])
    local w = redis.pcall('HSET', K[ko + 3], 'message_id', A[ao + 6])
    if existed == 0 and type(w) == 'number' then redis.call('EXPIRE', K[ko + 3], CACHE_EXPIRY_S) end
  end
  local r = {'ok'}
  if next_id ~= '' then
    local next_cache = ''
    if A[ao + 13] == '1' then next_cache = K[ko + 4] end
    r = begin_entry(st, stream, group, next_cache, me, A[ao + 11], next_id, A[ao + 10], ttl,
      tonumber(A[ao + 12]), now)
    table.insert(r, 1, 'ok')
  end
  flush(chan, st)
  return r
end
