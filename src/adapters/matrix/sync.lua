-- Commit one step of the Matrix syncer, only while the lease is ours.
-- KEYS: lease, since, rooms, inbound, joins, undecrypted (one hash slot:
-- sg:{P}:…)
-- ARGV[1] owner, ARGV[2] the new since token ('' = leave it), ARGV[3] the
-- inbound stream's MAXLEN, ARGV[4] JSON:
--   {"events": [payload, …],           -- XADDed in this order
--    "rooms": {room: last event id},   -- HSET into rooms
--    "joins": {room: pending join},    -- HSET into joins
--    "done": [room, …],                -- HDEL from joins
--    "undecrypted": {event id: json},  -- HSET into undecrypted (at most
--                                      -- MAX_UNDECRYPTED kept)
--    "resolved": [event id, …]}        -- HDEL from undecrypted
-- Returns 1, or 0 (nothing written) when the lease is not ours.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local w = cjson.decode(ARGV[4])
for _, p in ipairs(w.events) do
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 'payload', p)
end
for room, id in pairs(w.rooms) do
  redis.call('HSET', KEYS[3], room, id)
end
for room, j in pairs(w.joins) do
  redis.call('HSET', KEYS[5], room, j)
end
for _, room in ipairs(w.done) do
  redis.call('HDEL', KEYS[5], room)
end
for _, id in ipairs(w.resolved or {}) do
  redis.call('HDEL', KEYS[6], id)
end
for id, ev in pairs(w.undecrypted or {}) do
  if redis.call('HLEN', KEYS[6]) < 1000 then
    redis.call('HSET', KEYS[6], id, ev)
  end
end
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[2], ARGV[2])
end
return 1
