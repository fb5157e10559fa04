-- watch.lua: ask for a notification when a job reaches a final state.
-- KEYS[1] hash of the job
-- Returns the job's current status, or false if it does not exist.
-- Invariant: the caller subscribes to the job's done channel before calling this, and the
-- settle scripts publish only for watched jobs, so no notification can fall in between and
-- jobs nobody waits for cost no PUBLISH.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return false
end
redis.call('HSET', KEYS[1], 'watch', 1)
return status
