-- Begin the send of one entry.
-- KEYS: chan, stream, cache (the message_key, or chan when there is none)
-- ARGV: group, me, consumer, id, seq, lock_ttl_ms, gap_timeout_ms, has_cache
local cache = ''
if ARGV[8] == '1' then cache = KEYS[3] end
local st = load(KEYS[1], 'unk:' .. ARGV[4])
local r = begin_entry(st, KEYS[2], ARGV[1], cache, ARGV[2], ARGV[3], ARGV[4], ARGV[5],
  tonumber(ARGV[6]), tonumber(ARGV[7]), now_ms())
flush(KEYS[1], st)
return r
