-- Hand entries of channels a live peer owns to that peer: they become
-- pending for it (their idle time and delivery count untouched) and their
-- ids go to its inbox.
-- KEYS: stream, nodes, inbox of the peer   ARGV: group, peer consumer, peer instance, ids…
-- Returns 1, or 0 when the peer is no longer live (nothing moved).
if redis.call('HGET', KEYS[2], ARGV[2]) ~= ARGV[3] then return 0 end
local ids = {}
for i = 4, #ARGV do ids[#ids + 1] = ARGV[i] end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(ids), 'JUSTID')
redis.call('RPUSH', KEYS[3], unpack(ids))
return 1
