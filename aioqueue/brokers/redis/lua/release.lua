#!lua flags=allow-oom
-- release.lua: hand unfinished jobs back at shutdown so another worker starts them at once.
-- KEYS[1] stream, KEYS[2] this request's reply memo, KEYS[2 + i] hash of job i
-- ARGV[1] group, ARGV[2] consumer, then per job i: job id, entry token
-- Covers jobs that were running (their concurrency slot is freed) and entries delivered
-- but never started (a read cut short, or begun while the queue was being paused).
-- Returns the number of jobs released.
-- Why not only XCLAIM ... IDLE: an entry made idle in the pending list waits for some
-- worker's next XAUTOCLAIM sweep. A fresh entry instead wakes a worker blocked in
-- XREADGROUP immediately. The old entry is acked and deleted in the same step, and the
-- delivery that was cut short is not counted against max_deliveries.
-- Repeat-safe: only entries still in this consumer's pending list are handed back, and
-- handing one back acks it, so a repeat finds nothing left to do; it answers the count
-- kept in the request's memo.
local memo = remembered(KEYS[2])
if memo then
  return memo
end
local group, consumer = ARGV[1], ARGV[2]
local base = string.sub(KEYS[1], 1, #KEYS[1] - #'stream')
local released = 0
for i = 1, #KEYS - 2 do
  local key = KEYS[2 + i]
  local id, entry = ARGV[1 + i * 2], ARGV[2 + i * 2]
  if holds(KEYS[1], group, entry, consumer) then
    ack(KEYS[1], group, {entry})
    local job = redis.call('HMGET', key, 'status', 'entry', 'worker', 'prio', 'slot')
    if (not job[2] or job[2] == entry) and (job[1] == 'queued' or job[1] == 'running') then
      free_slot(base, KEYS[1], base .. 'delayed', key, id, job[5])
      local fresh = push(KEYS[1], id, job[4])
      redis.call('HSET', key, 'status', 'queued', 'entry', fresh)
      if job[1] == 'running' and job[3] == consumer then
        redis.call('HINCRBY', key, 'deliveries', -1)
      end
      released = released + 1
    end
  end
end
return remember(KEYS[2], released)
