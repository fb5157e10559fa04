#!lua flags=allow-oom
-- watch.lua: ask for a notification when a job reaches a final state.
-- KEYS[1] hash of the job
-- ARGV[1] the caller's notification channel (one per client process, not per job)
-- Returns the job's current status, or false if it does not exist.
-- Invariant: the caller is subscribed to its channel before calling this, and every script
-- that makes a job final publishes the job id to each watcher channel (notify()), so no
-- notification can fall between this check and the wait. Each channel is one hash field,
-- so watching again (a repeat, or a second waiter in the same process) adds nothing.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return false
end
if redis.call('HSETNX', KEYS[1], 'w:' .. ARGV[1], 1) == 1 then
  redis.call('HINCRBY', KEYS[1], 'watchers', 1)
end
return status
