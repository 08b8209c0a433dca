-- Begin the send of one entry.
-- KEYS: chan, stream, cache (the message_key, or chan when there is none)
-- ARGV: group, me, consumer, id, seq, lock_ttl_ms, gap_timeout_ms, has_cache
local cache = ''
if ARGV[8] == '1' then cache = KEYS[3] end
return begin_entry(KEYS[1], KEYS[2], ARGV[1], cache, ARGV[2], ARGV[3], ARGV[4], ARGV[5],
  tonumber(ARGV[6]), tonumber(ARGV[7]))
