#!lua flags=allow-oom
-- forget_consumers.lua: remove consumers of workers that are gone from the consumer group.
-- KEYS[1] stream, KEYS[2] this request's reply memo, KEYS[2 + i] heartbeat key of the
--   worker behind consumer i
-- ARGV[1] group, ARGV[1 + i] consumer name i
-- Returns the number of consumers removed.
-- Invariant: XGROUP DELCONSUMER drops the consumer's pending entries with it, so a consumer
-- is removed only while its pending list is empty and its worker's heartbeat has expired,
-- both checked in this same step. Repeat-safe: a consumer already removed is skipped, and
-- the count is kept in the request's memo.
local memo = remembered(KEYS[2])
if memo then
  return memo
end
local removed = 0
for i = 1, #KEYS - 2 do
  local consumer = ARGV[1 + i]
  if redis.call('EXISTS', KEYS[2 + i]) == 0
    and #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, consumer) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], consumer)
    removed = removed + 1
  end
end
return remember(KEYS[2], removed)
