-- requeue.lua: give dead-lettered jobs a fresh start.
-- KEYS[1] stream, KEYS[2] dead zset, KEYS[3] events stream, KEYS[3 + i] hash of job i
-- ARGV[1] a token unique to this request, ARGV[2] events cap, then per job i: job id
-- Returns the number of jobs requeued (ids not in the dead zset, and dead letters that hold
-- no job to run, such as a foreign stream entry's record, are left as they are).
-- Invariant: a job leaves the dead zset in the same step that puts it back on the stream
-- with its attempt and delivery counters reset; its last error stays for reference.
-- Repeat-safe: the request's token is checked before anything else, so a request re-sent
-- after a lost reply counts the jobs it requeued and never requeues one again, even if
-- the job died again in between.
local requeued = 0
local now = redis_now()
local events = {}
for i = 1, #KEYS - 3 do
  local key = KEYS[3 + i]
  local id = ARGV[2 + i]
  if redis.call('HGET', key, 'requeued') == ARGV[1] then
    requeued = requeued + 1
  elseif redis.call('ZSCORE', KEYS[2], id) and redis.call('HEXISTS', key, 'env') == 1 then
    redis.call('ZREM', KEYS[2], id)
    local entry = push(KEYS[1], id, redis.call('HGET', key, 'prio'))
    redis.call('HSET', key, 'status', 'queued', 'attempt', 1, 'deliveries', 0,
      'entry', entry, 'enqueued', now, 'requeued', ARGV[1])
    redis.call('HDEL', key, 'finished', 'run_at', 'started', 'worker')
    event(events, id, 'enqueued', 'queued')
    requeued = requeued + 1
  end
end
flush_events(KEYS[3], ARGV[2], events)
return requeued
