-- Replay one dead letter: append the rebuilt entry to the outbound stream and
-- delete it from the dead-letter stream, atomically. A dead letter that is no
-- longer there (replayed or purged meanwhile) is left alone.
-- KEYS: dlq, stream
-- ARGV: dlq_id, payload, sig ('' when unsigned)
-- Returns the new stream id, or false when the dead letter was gone.
local dlq, stream, id = KEYS[1], KEYS[2], ARGV[1]
if #redis.call('XRANGE', dlq, id, id, 'COUNT', 1) == 0 then return false end
local new_id
if ARGV[3] ~= '' then
  new_id = redis.call('XADD', stream, '*', 'payload', ARGV[2], 'sig', ARGV[3])
else
  new_id = redis.call('XADD', stream, '*', 'payload', ARGV[2])
end
redis.call('XDEL', dlq, id)
return new_id
