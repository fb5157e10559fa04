-- settle_done.lua: record results and remove the jobs from the stream in the same step.
-- KEYS[1] stream, KEYS[1 + i] hash of job i
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] now (ms), ARGV[4] result TTL (ms),
--   then per job i: job id, stream entry id, encoded result
-- Returns per job 1 if settled, 0 if this consumer no longer owned the entry (its lease
-- expired and another worker took over; that worker's outcome will count instead).
-- Invariant (at-least-once): an entry leaves the stream only together with its outcome.
-- A job aborted while it ran keeps status 'aborted'; its entry is still acked.
local group, consumer, now, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local out = {}
for i = 1, #KEYS - 1 do
  local key = KEYS[1 + i]
  local at = 4 + (i - 1) * 3
  local id, entry, result = ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  local owner = redis.call('XPENDING', KEYS[1], group, entry, entry, 1, consumer)
  if #owner == 0 then
    out[i] = 0
  else
    if redis.call('HGET', key, 'status') ~= 'aborted' then
      redis.call('HSET', key, 'status', 'complete', 'result', result, 'finished', now)
      redis.call('PEXPIRE', key, ttl)
      local watchers = redis.call('HGET', key, 'watch')
      if watchers then
        for channel in string.gmatch(watchers, '%S+') do
          redis.call('PUBLISH', channel, id)
        end
      end
    end
    redis.call('XACK', KEYS[1], group, entry)
    redis.call('XDEL', KEYS[1], entry)
    out[i] = 1
  end
end
return out
