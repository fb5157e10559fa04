-- abort.lua: abort a queued, delayed or running job.
-- KEYS[1] stream, KEYS[2] delayed zset, KEYS[3] hash of the job
-- ARGV[1] job id, ARGV[2] group, ARGV[3] now (ms), ARGV[4] result TTL (ms),
--   ARGV[5] abort channel
-- Returns the status the job had ('not_found' if none).
-- Invariant: a queued or delayed job leaves the stream / zset here; a running job is
-- marked aborted and its worker is told on the abort channel to cancel it. The settle
-- scripts never overwrite 'aborted', so a run that finishes anyway cannot resurrect it.
local status = redis.call('HGET', KEYS[3], 'status')
if not status then
  return 'not_found'
end
if status == 'complete' or status == 'failed' or status == 'dead' or status == 'aborted' then
  return status
end
if status == 'scheduled' or status == 'retrying' then
  redis.call('ZREM', KEYS[2], ARGV[1])
elseif status == 'queued' then
  local entry = redis.call('HGET', KEYS[3], 'entry')
  if entry then
    -- pcall: the group may not exist yet if no worker ever started.
    redis.pcall('XACK', KEYS[1], ARGV[2], entry)
    redis.call('XDEL', KEYS[1], entry)
  end
end
redis.call('HSET', KEYS[3], 'status', 'aborted', 'finished', ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
if status == 'running' then
  redis.call('PUBLISH', ARGV[5], ARGV[1])
end
local watchers = redis.call('HGET', KEYS[3], 'watch')
if watchers then
  for channel in string.gmatch(watchers, '%S+') do
    redis.call('PUBLISH', channel, ARGV[1])
  end
end
return status
