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
local streams = {KEYS[1]}
for _, level in ipairs(redis.call('SMEMBERS', KEYS[1] .. ':lanes')) do
  if redis.call('EXISTS', KEYS[1] .. ':' .. level) == 1 then
    streams[#streams + 1] = KEYS[1] .. ':' .. level
  end
end
-- A lane whose group no worker has created yet holds no consumer: pcall.
local function idle(consumer)
  for _, s in ipairs(streams) do
    local pending = redis.pcall('XPENDING', s, ARGV[1], '-', '+', 1, consumer)
    if pending.err == nil and #pending > 0 then
      return false
    end
  end
  return true
end
for i = 1, #KEYS - 2 do
  local consumer = ARGV[1 + i]
  if redis.call('EXISTS', KEYS[2 + i]) == 0 and idle(consumer) then
    for _, s in ipairs(streams) do
      redis.pcall('XGROUP', 'DELCONSUMER', s, ARGV[1], consumer)
    end
    removed = removed + 1
  end
end
return remember(KEYS[2], removed)
