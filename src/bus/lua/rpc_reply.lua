-- Answer an RPC: push the reply (60 s expiry) and acknowledge the request —
-- the acknowledgement only if the reply was written (G9).
-- KEYS: reply list, stream   ARGV: reply, group, id
local r = redis.pcall('RPUSH', KEYS[1], ARGV[1])
if type(r) == 'table' and r.err then return redis.error_reply(r.err) end
redis.call('EXPIRE', KEYS[1], 60)
redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
return 1
