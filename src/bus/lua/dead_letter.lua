-- Move one entry to the dead-letter stream and acknowledge it, atomically.
-- KEYS: chan (or the dlq when the entry has no channel), stream, dlq
-- ARGV: group, me, token ('' when no lock is involved), id, seq, release, lock_ttl_ms,
--       dlq_maxlen, then field/value pairs for the dead-letter entry
local chan, stream, dlq, group, me, token = KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3]
local st = nil
if token ~= '' then
  st = load(chan, nil)
  if st.owner ~= me or st.token ~= token then return {'stale'} end
end
local fields = {}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
if tonumber(ARGV[8]) > 0 then
  redis.call('XADD', dlq, 'MAXLEN', '~', ARGV[8], '*', unpack(fields))
else
  redis.call('XADD', dlq, '*', unpack(fields))
end
if st then
  local now = 0
  if ARGV[6] ~= '1' then now = now_ms() end
  finish_entry(st, stream, group, ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), now)
  st.expire = true
  flush(chan, st)
else
  redis.call('XACK', stream, group, ARGV[4])
end
flush_acks()
return {'ok'}
