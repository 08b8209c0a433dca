-- The entries with these ids, each as {id, fields} or {id} when the stream
-- no longer holds it. Reads only.
-- KEYS: stream   ARGV: ids…
local out = {}
for i = 1, #ARGV do
  local r = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i], 'COUNT', 1)
  if #r > 0 then out[#out + 1] = r[1] else out[#out + 1] = {ARGV[i]} end
end
return out
