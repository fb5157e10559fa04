#!lua flags=allow-oom
-- purge_dead.lua: delete dead-lettered jobs for good.
-- KEYS[1] dead zset, KEYS[2] this request's reply memo, KEYS[2 + i] hash of job i
-- ARGV[i] job id i
-- Returns the number of jobs deleted.
-- Invariant: only jobs in the dead zset are deleted; an id that is not dead (a live job, a
-- typo) is left alone, so purging can never lose a job that is still queued or running.
-- Repeat-safe: the records are gone after the first run, so the answer is kept for a few
-- minutes under a key unique to the request, and a re-sent request returns it.
local memo = remembered(KEYS[2])
if memo then
  return memo
end
local purged = 0
for i = 1, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('DEL', KEYS[2 + i])
    purged = purged + 1
  end
end
return remember(KEYS[2], purged)
