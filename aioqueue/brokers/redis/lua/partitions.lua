-- partitions.lua: record how many partitions a queue has, once (docs/deploying.md).
-- KEYS[1] the queue's partitions key; KEYS[2..] where a queue of one partition keeps jobs
-- (its stream, its priority lanes' set, its delayed and dead sets); ARGV[1] the partitions
-- this process was given. Returns the number on record: ARGV[1] if this call recorded it
-- (1 is recorded too), 1 for a queue that already holds jobs as a single partition.
local stored = redis.call('GET', KEYS[1])
if stored then
  return tonumber(stored)
end
if ARGV[1] ~= '1' and redis.call('EXISTS', unpack(KEYS, 2)) > 0 then
  return 1
end
redis.call('SET', KEYS[1], ARGV[1])
return tonumber(ARGV[1])
