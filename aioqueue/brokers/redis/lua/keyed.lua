-- keyed.lua: enqueue one job under a debounce or throttle key (docs/flow-control.md).
-- KEYS[1] stream, KEYS[2] delayed zset, KEYS[3] events stream, KEYS[4] the key's slot
--   (a string holding the id of the job that holds the key, Keys.keyed), KEYS[5] hash of
--   the new job, KEYS[6] this request's memo (Keys.memo of the new job's id)
-- ARGV[1] 'debounce' or 'throttle', ARGV[2] new job id, ARGV[3] its envelope,
--   ARGV[4] the window (ms), ARGV[5] max_size (0 = unlimited), ARGV[6] result TTL (ms),
--   ARGV[7] events cap
-- Returns the id of the job that answers this enqueue: the new job, or (throttle) the job
-- that holds the key in its window; -1 when the new job would take ready + delayed past
-- max_size (nothing is written).
-- Invariants:
--   debounce: the new job is scheduled a window from now (Redis's clock) and the slot names
--     it. A job the slot named that is still scheduled (in the delayed zset, never started)
--     is replaced in the same step: it leaves the zset and ends aborted, reason 'debounced',
--     'replaced_by' naming the new job, so its waiters follow the replacement. A job
--     queued, running or retrying is left alone: its window has passed, and the new job
--     opens the next one. Of a burst, only the last job runs.
--   throttle: the slot exists for one window from the job that took it (SET PX); while it
--     does, no job is written and the holder answers. At most one job per window per key.
-- The slot expires a minute after the window (debounce), so keys nobody uses again go.
-- The replaced job's hash is reached by the id the slot holds, under the new job's key
-- prefix (like the workflow helpers' dependants): only Redis knows it, and it stays in the
-- queue's hash slot.
-- Repeat-safe: the envelope (which holds the enqueue time) is unique to the request, so a
-- new job whose hash already holds it was written by this very call before its reply was
-- lost: the repeat answers its id and replaces nothing. A refused throttle call writes no
-- job; when the slot could expire before a re-sent call arrives, it keeps its answer in the
-- request's memo (ten minutes, as every memo), which a repeat answers from.
local MARGIN_MS = 60000
local MEMO_MS = 600000
local mode, id, env = ARGV[1], ARGV[2], ARGV[3]
local window, max_size = tonumber(ARGV[4]), tonumber(ARGV[5])

-- The same request again, or (as enqueue answers) an id that exists: the job under it.
if redis.call('HGET', KEYS[5], 'env') then
  return id
end

local previous, pkey
if mode == 'throttle' then
  local memo = redis.call('GET', KEYS[6])
  if memo then
    return memo
  end
  local holder = redis.call('GET', KEYS[4])
  if holder then
    if redis.call('PTTL', KEYS[4]) < MEMO_MS then
      remember(KEYS[6], holder)
    end
    return holder
  end
else
  local named = redis.call('GET', KEYS[4])
  if named then
    local key = string.sub(KEYS[5], 1, #KEYS[5] - #id) .. named
    if redis.call('HGET', key, 'status') == 'scheduled' then
      previous, pkey = named, key
    end
  end
end

-- A replaced job leaves the delayed zset as the new one enters it: the size stays.
if max_size > 0 and not previous then
  if redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2]) + 1 > max_size then
    return -1
  end
end

local now = redis_now()
local events = {}
if mode == 'throttle' then
  local entry = redis.call('XADD', KEYS[1], '*', 'j', id)
  redis.call('HSET', KEYS[5], 'env', env, 'status', 'queued', 'enqueued', now, 'entry', entry)
  redis.call('SET', KEYS[4], id, 'PX', window)
  event(events, id, 'enqueued', 'queued')
else
  local run_at = now + window
  redis.call('HSET', KEYS[5], 'env', env, 'status', 'scheduled', 'enqueued', now,
    'run_at', run_at)
  redis.call('ZADD', KEYS[2], run_at, id)
  redis.call('SET', KEYS[4], id, 'PX', window + MARGIN_MS)
  event(events, id, 'enqueued', 'scheduled')
end

if previous then
  redis.call('ZREM', KEYS[2], previous)
  redis.call('HSET', pkey, 'status', 'aborted', 'finished', now, 'reason', 'debounced',
    'replaced_by', id)
  redis.call('PEXPIRE', pkey, ARGV[6])
  notify(pkey, previous, redis.call('HGET', pkey, 'watchers'))
  event(events, previous, 'aborted', 'debounced')
  -- Jobs that wait on the replaced one (depends_on) get its outcome, as after an abort.
  if redis.call('HEXISTS', pkey, 'next') == 1 then
    flow_drain({stream = KEYS[1], delayed = KEYS[2], ttl = ARGV[6], now = tostring(now),
      prefix = string.sub(KEYS[5], 1, #KEYS[5] - #id), events = events}, {previous})
  end
end
flush_events(KEYS[3], ARGV[7], events)
return id
