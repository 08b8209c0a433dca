-- Commit a finished delivery and, optionally, begin the next entry of the same
-- channel in the same round trip.
-- KEYS: chan, stream, cache (message_key or chan), next_cache (or chan)
-- ARGV: group, me, token, id, seq, message_id, release, lock_ttl_ms,
--       next_id, next_seq, consumer, gap_timeout_ms, next_has_cache
-- Returns {'stale'} when the fencing token is no longer ours (nothing written),
-- else {'ok'} or {'ok', <begin result of the next entry>...}.
local chan, stream, group, me, token = KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]
local next_id = ARGV[9]
local unk_field = nil
if next_id ~= '' then unk_field = 'unk:' .. next_id end
local st = load(chan, unk_field)
if st.owner ~= me or st.token ~= token then return {'stale'} end
local ttl = tonumber(ARGV[8])
local now = 0
if ARGV[7] ~= '1' or next_id ~= '' then now = now_ms() end
finish_entry(st, stream, group, ARGV[4], ARGV[5], ARGV[7], ttl, now)
if ARGV[6] ~= '' and KEYS[3] ~= chan then
  local existed = redis.call('EXISTS', KEYS[3])
  redis.call('HSET', KEYS[3], 'message_id', ARGV[6])
  if existed == 0 then redis.call('EXPIRE', KEYS[3], CACHE_EXPIRY_S) end
end
local r = {'ok'}
if next_id ~= '' then
  local next_cache = ''
  if ARGV[13] == '1' then next_cache = KEYS[4] end
  r = begin_entry(st, stream, group, next_cache, me, ARGV[11], next_id, ARGV[10], ttl,
    tonumber(ARGV[12]), now)
  table.insert(r, 1, 'ok')
end
flush(chan, st)
return r
