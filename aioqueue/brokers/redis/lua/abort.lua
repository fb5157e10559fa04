#!lua flags=allow-oom
-- abort.lua: abort a queued, delayed, waiting or running job.
-- KEYS[1] stream, KEYS[2] delayed zset, KEYS[3] hash of the job, KEYS[4] events stream
-- ARGV[1] job id, ARGV[2] group, ARGV[3] result TTL (ms), ARGV[4] abort channel,
--   ARGV[5] a token unique to this abort request, ARGV[6] events cap
-- Returns the status the job had ('not_found' if none).
-- Invariant: a queued or delayed job leaves the stream / zset here; a running job is
-- marked aborted and its worker is told on the abort channel to cancel it. The settle
-- script never overwrites 'aborted', so a run that finishes anyway cannot resurrect it.
-- Workflows: the job's dependants get its outcome (aborted) in the same step.
-- Repeat-safe: the request's token and the status it found are kept on the job, so the
-- same request re-sent after a lost reply answers what it answered the first time.
local status, token, found = unpack(redis.call('HMGET', KEYS[3], 'status', 'abort_token',
  'aborted_from'))
if not status then
  return 'not_found'
end
if status == 'aborted' and token == ARGV[5] then
  return found
end
if status == 'complete' or status == 'failed' or status == 'dead' or status == 'aborted' then
  return status
end
if status == 'scheduled' or status == 'retrying' then
  redis.call('ZREM', KEYS[2], ARGV[1])
elseif status == 'queued' then
  local token = redis.call('HGET', KEYS[3], 'entry')
  if token then
    -- pcall: the group may not exist yet if no worker ever started.
    local s, entry = untoken(KEYS[1], token)
    redis.pcall('XACK', s, ARGV[2], entry)
    redis.call('XDEL', s, entry)
  end
end
redis.call('HSET', KEYS[3], 'status', 'aborted', 'finished', redis_now(),
  'abort_token', ARGV[5], 'aborted_from', status)
redis.call('PEXPIRE', KEYS[3], ARGV[3])
if status == 'running' then
  -- pcall: without the right to publish, the worker's lease renewal still finds the job
  -- aborted and cancels it.
  redis.pcall('SPUBLISH', ARGV[4], ARGV[1])
end
notify(KEYS[3], ARGV[1], redis.call('HGET', KEYS[3], 'watchers'))
local events = {}
event(events, ARGV[1], 'aborted', status)
if redis.call('HEXISTS', KEYS[3], 'next') == 1 then
  flow_drain({stream = KEYS[1], delayed = KEYS[2], ttl = ARGV[3], now = redis_now_text(),
    prefix = string.sub(KEYS[3], 1, #KEYS[3] - #ARGV[1]), events = events}, {ARGV[1]})
end
flush_events(KEYS[4], ARGV[6], events)
return status
