-- begin.lua: turn delivered stream entries into running jobs, counting every delivery.
-- KEYS[1] stream, KEYS[2] dead zset, KEYS[2 + i] hash of job i
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] max_deliveries, ARGV[4] now (ms),
--   ARGV[5] '1' to check that the consumer still owns each entry (entries taken over with
--   XAUTOCLAIM), '0' for entries XREADGROUP handed over in the same breath,
--   then per job i: job id, stream entry id
-- Returns per job one of:
--   {'run', envelope or false, attempt, deliveries}  the caller owns the job and runs it
--   {'skip'}   the job is gone, aborted or already final: its entry was acked and deleted
--   {'lost'}   another consumer owns the entry now: leave it alone
--   {'dead', deliveries}  delivered more than max_deliveries times: dead-lettered
-- Invariant: deliveries counts every hand-over of the current attempt, crash redeliveries
-- included, so a job that kills its worker cannot loop forever. The hash records the
-- consumer and entry that began the job; settle scripts accept outcomes only from them.
local group, consumer = ARGV[1], ARGV[2]
local max_deliveries = tonumber(ARGV[3])
local now = ARGV[4]
local check = ARGV[5] == '1'
local final = {complete = true, failed = true, dead = true, aborted = true}
local out, acked = {}, {}
for i = 1, #KEYS - 2 do
  local key = KEYS[2 + i]
  local id, entry = ARGV[4 + i * 2], ARGV[5 + i * 2]
  if check and #redis.call('XPENDING', KEYS[1], group, entry, entry, 1, consumer) == 0 then
    out[i] = {'lost'}
  else
    local job = redis.call('HMGET', key, 'status', 'env', 'attempt')
    if not job[1] or final[job[1]] then
      acked[#acked + 1] = entry
      out[i] = {'skip'}
    else
      local deliveries = redis.call('HINCRBY', key, 'deliveries', 1)
      if deliveries > max_deliveries then
        redis.call('HSET', key, 'status', 'dead', 'finished', now,
          'reason', 'worker lost ' .. (deliveries - 1) .. ' times')
        redis.call('PERSIST', key)
        redis.call('ZADD', KEYS[2], now, id)
        acked[#acked + 1] = entry
        local watchers = redis.call('HGET', key, 'watch')
        if watchers then
          for channel in string.gmatch(watchers, '%S+') do
            redis.call('PUBLISH', channel, id)
          end
        end
        out[i] = {'dead', deliveries}
      else
        redis.call('HSET', key, 'status', 'running', 'started', now, 'worker', consumer,
          'entry', entry)
        out[i] = {'run', job[2], tonumber(job[3]) or 1, deliveries}
      end
    end
  end
end
if #acked > 0 then
  redis.call('XACK', KEYS[1], group, unpack(acked))
  redis.call('XDEL', KEYS[1], unpack(acked))
end
return out
