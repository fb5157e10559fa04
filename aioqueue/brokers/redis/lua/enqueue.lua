-- enqueue.lua: write a batch of new jobs, all or nothing with respect to max_size.
-- KEYS[1] stream, KEYS[2] delayed zset, KEYS[2 + i] hash of job i
-- ARGV[1] max_size (0 = unlimited), ARGV[2] now (ms),
--   then per job i: job id, encoded envelope, run_at (ms; 0 or past = ready now)
-- Returns -1 when the new jobs would take ready + delayed past max_size (nothing is
-- written), else a table with 1 for each job written and 0 for each id that already existed.
-- Invariant: a job id exists at most once, and a live job is in exactly one of the ready
-- stream and the delayed zset. Counting and writing in one script makes QueueFull exact.
local max_size = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local n = #KEYS - 2
local fresh = {}
local seen = {}
local new = 0
for i = 1, n do
  local key = KEYS[2 + i]
  if not seen[key] and redis.call('EXISTS', key) == 0 then
    fresh[i] = true
    new = new + 1
  end
  seen[key] = true
end
if max_size > 0 and new > 0 then
  local size = redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
  if size + new > max_size then
    return -1
  end
end
local out = {}
for i = 1, n do
  if fresh[i] then
    local at = 2 + (i - 1) * 3
    local id, env, run_at = ARGV[at + 1], ARGV[at + 2], tonumber(ARGV[at + 3])
    if run_at > now then
      redis.call('HSET', KEYS[2 + i], 'env', env, 'status', 'scheduled', 'attempt', 1,
        'deliveries', 0, 'enqueued', now, 'run_at', run_at)
      redis.call('ZADD', KEYS[2], run_at, id)
    else
      local entry = redis.call('XADD', KEYS[1], '*', 'j', id)
      redis.call('HSET', KEYS[2 + i], 'env', env, 'status', 'queued', 'attempt', 1,
        'deliveries', 0, 'enqueued', now, 'entry', entry)
    end
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
