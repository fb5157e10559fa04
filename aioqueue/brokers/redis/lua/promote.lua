-- promote.lua: move due jobs from the delayed zset to the ready stream.
-- KEYS[1] stream, KEYS[2] delayed zset, KEYS[2 + i] hash of job i
-- ARGV[1] now (ms), then per job i: job id
-- Returns the score (ms) of the earliest job still delayed, or false if none.
-- Invariant: ZREM decides which worker promotes a job, so concurrent promoters never add it
-- to the stream twice; a job whose hash is gone or aborted is dropped instead.
local now = tonumber(ARGV[1])
for i = 1, #KEYS - 2 do
  local key = KEYS[2 + i]
  local id = ARGV[1 + i]
  local score = redis.call('ZSCORE', KEYS[2], id)
  if score and tonumber(score) <= now and redis.call('ZREM', KEYS[2], id) == 1 then
    local status = redis.call('HGET', key, 'status')
    if status == 'scheduled' or status == 'retrying' then
      local entry = redis.call('XADD', KEYS[1], '*', 'j', id)
      redis.call('HSET', key, 'status', 'queued', 'entry', entry)
    end
  end
end
local head = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #head == 0 then
  return false
end
return head[2]
