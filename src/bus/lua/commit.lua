-- Commit a finished delivery (and maybe begin the channel's next entry): see
-- `commit_op` in the prelude.
local r = commit_op(KEYS, 0, ARGV, 0)
flush_acks()
return r
