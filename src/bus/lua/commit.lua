-- Commit a batch of finished entries of one platform, across channels, in
-- one call: delivered marks, de-duplication records, dead letters, acks.
-- Refused as a whole ({'stale'}) unless this instance is still registered:
-- a channel is only ever taken from an instance that is not, so a live
-- registration proves every channel named here is still ours (G3b).
-- KEYS: stream, nodes, dlq, sent bucket, sending, chan_1 … chan_n
-- ARGV: group, consumer, instance, dlq_maxlen, sent_ttl_ms, n,
--       done_1 … done_n,
--       nack, ack ids…,
--       nsent, (idempotency key, message id)…,
--       nsending, ids…,
--       ndead, (id, force, nfields, fields…)…
-- Returns {'ok', dead letters written}.
local stream, nodes, dlq, sent, sending = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local group = ARGV[1]
if redis.call('HGET', nodes, ARGV[2]) ~= ARGV[3] then return {'stale'} end
local i = 7
local n = tonumber(ARGV[6])
for c = 1, n do
  if ARGV[i] ~= '' then redis.call('HSET', KEYS[5 + c], 'done', ARGV[i]) end
  i = i + 1
end
local nack = tonumber(ARGV[i]); i = i + 1
if nack > 0 then
  redis.call('XACK', stream, group, unpack(ARGV, i, i + nack - 1))
  i = i + nack
end
local nsent = tonumber(ARGV[i]); i = i + 1
if nsent > 0 then
  redis.call('HSET', sent, unpack(ARGV, i, i + 2 * nsent - 1))
  redis.call('PEXPIRE', sent, ARGV[5], 'NX')
  i = i + 2 * nsent
end
local nsending = tonumber(ARGV[i]); i = i + 1
if nsending > 0 then
  redis.call('HDEL', sending, unpack(ARGV, i, i + nsending - 1))
  i = i + nsending
end
local ndead = tonumber(ARGV[i]); i = i + 1
local written = 0
for d = 1, ndead do
  local id, force, nf = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 1
  -- Acked here first: a commit retried after a lost reply writes no second
  -- dead letter for an entry the first try already moved. An entry lost
  -- from the stream may be gone from the pending list too (`force`).
  if redis.call('XACK', stream, group, id) == 1 or force == '1' then
    if tonumber(ARGV[4]) > 0 then
      redis.call('XADD', dlq, 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, i + 2, i + 1 + nf))
    else
      redis.call('XADD', dlq, '*', unpack(ARGV, i + 2, i + 1 + nf))
    end
    written = written + 1
  end
  i = i + 2 + nf
end
return {'ok', written}
