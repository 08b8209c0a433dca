-- Begin the send of one entry: see `begin_op` in the prelude.
local r = begin_op(KEYS, 0, ARGV, 0)
flush_acks()
return r
