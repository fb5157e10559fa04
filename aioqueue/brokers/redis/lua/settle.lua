#!lua flags=allow-oom
-- settle.lua: record the outcomes of finished jobs and remove their entries from the stream
-- in the same step.
-- KEYS[1] stream, KEYS[2] delayed zset, KEYS[3] dead zset, KEYS[4] events stream,
--   KEYS[4 + i] hash of job i
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] result TTL (ms), ARGV[4] events cap,
--   then per job i: job id, stream entry id, outcome, and by outcome:
--   'complete': encoded result
--   'retry': encoded error, reason, delay (ms): the job runs again after the delay,
--     attempt + 1
--   'failed' / 'dead' / 'aborted': encoded error, reason
-- Returns per job 1 if the outcome is recorded, 0 if this consumer no longer owned the job
-- (its lease expired and another worker began it: that run's outcome counts), 2 if the job
-- was aborted while it ran (its entry is acked; it stays 'aborted', whatever the outcome).
-- Invariants: an entry leaves the stream only together with its outcome (at-least-once);
-- backoff lives in the delayed zset, never in worker memory; dead jobs are listed in the
-- dead zset and kept (no TTL) until requeued or purged; complete, failed and aborted jobs
-- expire after the result TTL. A job aborted while it ran stays 'aborted'.
-- Ownership: the hash records which consumer began the job and from which entry; only that
-- pair may settle it. Repeat-safe: the first settle moves the job out of 'running', so a
-- repeat from the same pair (the reply was lost and the client re-sent the call) finds the
-- outcome recorded and changes nothing: one failure uses up one attempt, never two. The
-- pair is also kept in 'settled', so a repeat that arrives after a retry was promoted (a
-- new entry) still answers 1.
-- Limits: the concurrency slot the job held (field 'slot') is freed in the same step, and
-- the oldest job waiting for it goes back to the stream (free_slot in _prelude.lua).
-- Workflows: a job with dependants ('next') hands them its final outcome in the same step
-- (see flow_drain in _prelude.lua); a retry is not final and hands over nothing.
local group, consumer, ttl = ARGV[1], ARGV[2], ARGV[3]
local now = redis_now()
local now_text = tostring(now)
local out, acked, work, events = {}, {}, {}, {}
local base = string.sub(KEYS[1], 1, #KEYS[1] - #'stream')
local at = 5
for i = 1, #KEYS - 4 do
  local key = KEYS[4 + i]
  local id, entry, outcome, data = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  local reason, delay = ARGV[at + 4], ARGV[at + 5]
  at = at + (outcome == 'complete' and 4 or (outcome == 'retry' and 6 or 5))
  local job = redis.pcall('HMGET', key, 'status', 'worker', 'entry', 'watchers', 'settled',
    'next', 'feed', 'slot')
  local pair = consumer .. ' ' .. entry
  if job.err then
    out[i] = 0  -- the key is no job record any more
  elseif job[2] ~= consumer or job[3] ~= entry then
    out[i] = job[5] == pair and 1 or 0
  elseif job[1] == 'aborted' and outcome ~= 'aborted' then
    free_slot(base, KEYS[1], KEYS[2], key, id, job[8])
    acked[#acked + 1] = entry
    out[i] = 2
  else
    free_slot(base, KEYS[1], KEYS[2], key, id, job[8])
    if job[1] == 'running' or (job[1] == 'aborted' and outcome == 'aborted') then
      if outcome == 'complete' then
        redis.call('HSET', key, 'status', 'complete', 'result', data, 'finished', now_text,
          'settled', pair)
        if job[7] then
          redis.call('HDEL', key, 'in:1')  -- a step's input is not kept once it ran
        end
        redis.call('PEXPIRE', key, ttl)
        notify(key, id, job[4])
        event(events, id, 'completed')
        if job[6] then
          work[#work + 1] = {id, {'complete', data, false, job[6]}}
        end
      elseif outcome == 'retry' then
        local run_at = now + tonumber(delay)
        -- A job that never failed before has no 'attempt' field yet: it was attempt 1.
        local attempt = (tonumber(redis.call('HGET', key, 'attempt')) or 1) + 1
        redis.call('HSET', key, 'status', 'retrying', 'error', data, 'reason', reason,
          'run_at', run_at, 'deliveries', 0, 'finished', now_text, 'attempt', attempt,
          'settled', pair)
        redis.call('ZADD', KEYS[2], run_at, id)
        event(events, id, 'retrying', reason, attempt)
      else
        redis.call('HSET', key, 'status', outcome, 'error', data, 'reason', reason,
          'finished', now_text, 'settled', pair)
        if outcome == 'dead' then
          redis.call('PERSIST', key)
          redis.call('ZADD', KEYS[3], now_text, id)
        else
          redis.call('PEXPIRE', key, ttl)
          if job[7] then
            redis.call('HDEL', key, 'in:1')  -- kept only for a dead job, to requeue it
          end
        end
        notify(key, id, job[4])
        -- A job aborted while it ran was announced and handed to its dependants by abort.
        if job[1] == 'running' then
          event(events, id, outcome, reason)
          if job[6] then
            work[#work + 1] = {id, {outcome, false, data, job[6]}}
          end
        end
      end
    end
    acked[#acked + 1] = entry
    out[i] = 1
  end
end
ack(KEYS[1], group, acked)
if #work > 0 then
  local first = KEYS[5]
  local ctx = {stream = KEYS[1], delayed = KEYS[2], ttl = ttl, now = now_text,
    prefix = string.sub(first, 1, #first - #ARGV[5]), events = events}
  flow_drain(ctx, work)
end
flush_events(KEYS[4], ARGV[4], events)
return out
