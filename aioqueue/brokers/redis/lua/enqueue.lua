-- enqueue.lua: write a batch of new jobs, all or nothing with respect to max_size.
-- KEYS[1] stream, KEYS[2] delayed zset, KEYS[2 + i] hash of job i
-- ARGV[1] max_size (0 = unlimited),
--   ARGV[2] length of the job-key prefix (the job id is the rest of KEYS[2 + i]),
--   ARGV[3] '1' if every job carries a run_at and a delay after its envelope, '0' if all
--   run now,
--   then per job i: encoded envelope [, run_at (ms on Redis's clock, 0 = none),
--   delay (ms from now on Redis's clock, 0 = none)]
-- Returns -1 when the new jobs would take ready + delayed past max_size (nothing is
-- written), else a table with 1 for each job written and 0 for each id that already existed.
-- Invariant: a job id exists at most once, and a live job is in exactly one of the ready
-- stream and the delayed zset. Counting and writing in one script makes QueueFull exact.
-- Repeat-safe: a job whose stored envelope is byte-for-byte the one given (the envelope
-- holds the enqueue time and the id) was written by this very call before its reply was
-- lost, and is reported as written again.
-- Due times are on Redis's clock, so a producer whose clock is off cannot make a delay
-- longer or shorter. The hash starts with only what every job needs; 'attempt' (1) and
-- 'deliveries' (0) are implied until first written, which keeps bulk enqueue cheap.
local max_size = tonumber(ARGV[1])
local skip = tonumber(ARGV[2])
local timed = ARGV[3] == '1'
local step = timed and 3 or 1
local n = #KEYS - 2
local fresh, repeated, seen = {}, {}, {}
local new = 0
for i = 1, n do
  local key = KEYS[2 + i]
  if not seen[key] then
    if redis.call('EXISTS', key) == 0 then
      fresh[i] = true
      new = new + 1
    elseif redis.call('HGET', key, 'env') == ARGV[4 + (i - 1) * step] then
      repeated[i] = true
    end
  end
  seen[key] = true
end
if max_size > 0 and new > 0 then
  local size = redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
  if size + new > max_size then
    return -1
  end
end
local now = redis_now()
local out = {}
for i = 1, n do
  if fresh[i] then
    local key = KEYS[2 + i]
    local id = string.sub(key, skip + 1)
    local at = 3 + (i - 1) * step
    local env = ARGV[at + 1]
    local run_at = 0
    if timed then
      run_at = tonumber(ARGV[at + 2])
      local delay = tonumber(ARGV[at + 3])
      if delay > 0 then
        run_at = math.max(run_at, now + delay)
      end
    end
    if run_at > now then
      redis.call('HSET', key, 'env', env, 'status', 'scheduled', 'enqueued', now, 'run_at', run_at)
      redis.call('ZADD', KEYS[2], run_at, id)
    else
      local entry = redis.call('XADD', KEYS[1], '*', 'j', id)
      redis.call('HSET', key, 'env', env, 'status', 'queued', 'enqueued', now, 'entry', entry)
    end
    out[i] = 1
  elseif repeated[i] then
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
