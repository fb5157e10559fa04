-- release.lua: hand unfinished jobs back at shutdown so another worker starts them at once.
-- KEYS[1] stream, KEYS[1 + i] hash of job i
-- ARGV[1] group, ARGV[2] consumer, then per job i: job id, stream entry id
-- Covers jobs that were running and entries delivered but never started (a read cut short).
-- Returns the number of jobs released.
-- Why not only XCLAIM ... IDLE: an entry made idle in the pending list waits for some
-- worker's next XAUTOCLAIM sweep. A fresh entry instead wakes a worker blocked in
-- XREADGROUP immediately. The old entry is acked and deleted in the same step, and the
-- delivery that was cut short is not counted against max_deliveries.
local group, consumer = ARGV[1], ARGV[2]
local released = 0
for i = 1, #KEYS - 1 do
  local key = KEYS[1 + i]
  local id, entry = ARGV[1 + i * 2], ARGV[2 + i * 2]
  local owner = redis.call('XPENDING', KEYS[1], group, entry, entry, 1, consumer)
  if #owner > 0 then
    redis.call('XACK', KEYS[1], group, entry)
    redis.call('XDEL', KEYS[1], entry)
    local status = redis.call('HGET', key, 'status')
    if status == 'running' or status == 'queued' then
      local fresh = redis.call('XADD', KEYS[1], '*', 'j', id)
      redis.call('HSET', key, 'status', 'queued', 'entry', fresh)
      if status == 'running' then
        redis.call('HINCRBY', key, 'deliveries', -1)
      end
      released = released + 1
    end
  end
end
return released
