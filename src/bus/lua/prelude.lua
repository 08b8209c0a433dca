-- Shared by every Stargazer script (concatenated in front of each).
--
-- Liveness (SPEC §3 G3b, G7): `sg:{P}:nodes` maps each live gateway's
-- consumer name to its instance id (`<consumer>/<random>`), `sg:{P}:beats`
-- to a counter it bumps every third of `lock_ttl_ms`. A consumer with no
-- entry in `nodes` is dead: its channels may be taken and its pending entries
-- claimed. Entries are only removed by the consumer itself (shutdown), by a
-- newer instance of the same name (restart), or by a peer's verdict after it
-- watched the counter stand still for `lock_ttl_ms` of its own live time —
-- never by a Redis-side expiry, so a Redis stall or restart kills nobody.
--
-- Channel hash `sg:{P}:chan:<id>`:
--   seq     producers' counter (HINCRBY); never touched here
--   done    highest seq finished (delivered, skipped or dead-lettered)
--   owner   instance owning the channel (the only one that sends and commits it)
--   token   fencing token: grows by one every time the channel changes owner
--   gap_seq, gap_since  the seq the owner has waited for (more than a second)
--           and since when (ms), for `stargazer status`; gone once it arrives

local IDLE_EXPIRY_MS = '2592000000' -- channel state lives 30 idle days

-- true while `instance` is the registered instance of its consumer
local function live(nodes, instance)
  local consumer = string.match(instance, '^(.*)/[^/]*$')
  return consumer ~= nil and redis.call('HGET', nodes, consumer) == instance
end
