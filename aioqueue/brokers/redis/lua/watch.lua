-- watch.lua: ask for a notification when a job reaches a final state.
-- KEYS[1] hash of the job
-- ARGV[1] the caller's notification channel (one per client process, not per job)
-- Returns the job's current status, or false if it does not exist.
-- Invariant: the caller is subscribed to its channel before calling this, and every script
-- that makes a job final publishes the job id to each channel in its 'watch' field, so no
-- notification can fall between this check and the wait. Jobs nobody waits for cost no
-- PUBLISH, and a client waiting on many jobs needs one subscription, not one per job.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return false
end
local watchers = redis.call('HGET', KEYS[1], 'watch')
if not watchers then
  redis.call('HSET', KEYS[1], 'watch', ARGV[1])
elseif not string.find(' ' .. watchers .. ' ', ' ' .. ARGV[1] .. ' ', 1, true) then
  redis.call('HSET', KEYS[1], 'watch', watchers .. ' ' .. ARGV[1])
end
return status
