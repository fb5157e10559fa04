#!lua flags=allow-oom
-- promote.lua: move due jobs from the delayed zset to the ready stream.
-- KEYS[1] stream, KEYS[2] delayed zset, KEYS[2 + i] hash of job i
-- ARGV[1] '1' to promote the given jobs whether due or not (aioqueue.testing's drain),
--   else '0'; ARGV[1 + i] job id i (candidates the caller found due by its estimate of
--   Redis's clock)
-- Returns {earliest score (ms) still delayed or false, Redis's clock (ms)}.
-- Invariant: a job is due by Redis's clock, never a caller's, so a worker whose clock runs
-- ahead cannot start delayed jobs early. ZREM decides which worker promotes a job, so
-- concurrent promoters (or a repeat of this call) never add it to the stream twice; a job
-- whose hash is gone or aborted is dropped instead.
local now = redis_now()
local early = ARGV[1] == '1'
for i = 1, #KEYS - 2 do
  local key = KEYS[2 + i]
  local id = ARGV[1 + i]
  local score = redis.call('ZSCORE', KEYS[2], id)
  if score and (early or tonumber(score) <= now) and redis.call('ZREM', KEYS[2], id) == 1 then
    local job = redis.call('HMGET', key, 'status', 'prio')
    if job[1] == 'scheduled' or job[1] == 'retrying' then
      local entry = push(KEYS[1], id, job[2])
      redis.call('HSET', key, 'status', 'queued', 'entry', entry)
    end
  end
end
local head = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
return {head[2] or false, now}
