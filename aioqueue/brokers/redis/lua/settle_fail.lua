-- settle_fail.lua: end jobs as 'failed', 'dead' or 'aborted', recording error and reason.
-- KEYS[1] stream, KEYS[2] dead zset, KEYS[2 + i] hash of job i
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] now (ms), ARGV[4] result TTL (ms),
--   then per job i: job id, stream entry id, status, encoded error, reason
-- Returns per job 1 if settled, 0 if this consumer no longer owned the job.
-- Invariant: dead jobs are listed in the dead zset and kept (no TTL) until requeued or
-- purged; failed and aborted jobs expire like results. The entry leaves the stream in the
-- same step.
-- Ownership: the job hash records which consumer began it and from which entry; a
-- worker whose lease expired and whose job another worker began since then no longer
-- matches and its outcome is dropped (the other run counts). Checking the hash instead of
-- XPENDING keeps this to one HMGET per job.
local group, consumer, now, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local out, acked = {}, {}
for i = 1, #KEYS - 2 do
  local key = KEYS[2 + i]
  local at = 4 + (i - 1) * 5
  local id, entry, status = ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  local job = redis.call('HMGET', key, 'status', 'worker', 'entry', 'watch')
  if job[2] ~= consumer or job[3] ~= entry then
    out[i] = 0
  else
    if job[1] ~= 'aborted' or status == 'aborted' then
      redis.call('HSET', key, 'status', status, 'error', ARGV[at + 4], 'reason', ARGV[at + 5],
        'finished', now)
      if status == 'dead' then
        redis.call('PERSIST', key)
        redis.call('ZADD', KEYS[2], now, id)
      else
        redis.call('PEXPIRE', key, ttl)
      end
      if job[4] then
        for channel in string.gmatch(job[4], '%S+') do
          redis.call('PUBLISH', channel, id)
        end
      end
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
