-- Several begin and commit steps (of any channels, any platforms) in one
-- call, one after another, exactly as if each had been its own script call.
-- ARGV: n, then per step: kind ('b' begin | 'c' commit), nkeys, nargs, its args
-- KEYS: every step's keys, in step order
-- Returns one reply per step: what the step's own script returns, or
-- {'err', message} when the step raised an error (the other steps still run;
-- the failed step acknowledged nothing and wrote no channel state).
local ops = {b = begin_op, c = commit_op}
local out = {}
local ki, ai = 1, 2
for i = 1, tonumber(ARGV[1]) do
  local kind, nk, na = ARGV[ai], tonumber(ARGV[ai + 1]), tonumber(ARGV[ai + 2])
  ai = ai + 3
  local n0 = #acks
  local ok, r = pcall(ops[kind], KEYS, ki - 1, ARGV, ai - 1)
  ki, ai = ki + nk, ai + na
  if not ok then drop_acks(n0) end
  if ok then
    out[i] = r
  elseif type(r) == 'table' and r.err then
    out[i] = {'err', r.err}
  else
    out[i] = {'err', tostring(r)}
  end
end
flush_acks()
return out
