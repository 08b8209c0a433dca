-- Record one event, fenced by the lease: the inbound XADD, the bot's nonce,
-- the channel -> guild pairs and the seq move together.
-- KEYS: lease, session, inbound, guilds, nonce.
-- ARGV: owner, seq ('' = leave), payload ('' = none), maxlen,
-- nonce's message id ('' = none), nonce ttl, then channel/guild pairs.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'payload', ARGV[3])
end
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[5], ARGV[5], 'EX', ARGV[6])
end
for i = 7, #ARGV - 1, 2 do
  redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1])
end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[2], 'seq', ARGV[2])
end
return 1
