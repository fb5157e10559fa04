-- settle_retry.lua: schedule the next attempt of failed jobs in the delayed zset.
-- KEYS[1] stream, KEYS[2] delayed zset, KEYS[2 + i] hash of job i
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] now (ms),
--   then per job i: job id, stream entry id, run_at (ms), encoded error, reason
-- Returns per job 1 if scheduled, 0 if this consumer no longer owned the job.
-- Invariant: backoff lives in Redis, never in worker memory; the entry leaves the stream in
-- the same step that puts the job in the delayed zset, so a crash cannot lose the retry.
-- Ownership: the job hash records which consumer began it and from which entry; a
-- worker whose lease expired and whose job another worker began since then no longer
-- matches and its outcome is dropped (the other run counts). Checking the hash instead of
-- XPENDING keeps this to one HMGET per job.
local group, consumer, now = ARGV[1], ARGV[2], ARGV[3]
local out, acked = {}, {}
for i = 1, #KEYS - 2 do
  local key = KEYS[2 + i]
  local at = 3 + (i - 1) * 5
  local id, entry, run_at = ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  local job = redis.call('HMGET', key, 'status', 'worker', 'entry', 'attempt')
  if job[2] ~= consumer or job[3] ~= entry then
    out[i] = 0
  else
    if job[1] ~= 'aborted' then
      -- A job that never failed before has no 'attempt' field yet: it was attempt 1.
      redis.call('HSET', key, 'status', 'retrying', 'error', ARGV[at + 4],
        'reason', ARGV[at + 5], 'run_at', run_at, 'deliveries', 0, 'finished', now,
        'attempt', (tonumber(job[4]) or 1) + 1)
      redis.call('ZADD', KEYS[2], run_at, id)
    end
    acked[#acked + 1] = entry
    out[i] = 1
  end
end
if #acked > 0 then
  redis.call('XACK', KEYS[1], group, unpack(acked))
  redis.call('XDEL', KEYS[1], unpack(acked))
end
return out
