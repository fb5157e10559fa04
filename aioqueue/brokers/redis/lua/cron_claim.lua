-- cron_claim.lua: claim one cron tick and enqueue its run, exactly once across workers.
-- KEYS[1] cron zset (name -> last claimed fire ms), KEYS[2] cron runs hash (name -> job id
--   of the last run), KEYS[3] stream, KEYS[4] hash of the new run's job,
--   KEYS[5] hash of the previous run's job (KEYS[4] again when there is none),
--   KEYS[6] heartbeat key of the worker that ran the previous run (KEYS[4] if none)
-- ARGV[1] cron job name, ARGV[2] fire time (ms), ARGV[3] last claimed fire time the caller
--   read ('' if none), ARGV[4] job id, ARGV[5] encoded envelope, ARGV[6] now (ms),
--   ARGV[7] '1' if the job is unique (a run never overlaps the previous one),
--   ARGV[8] the previous run's worker id as the caller read it ('' if none)
-- Returns 1 when this call claimed the tick and enqueued its run, 0 when the tick was
-- already claimed (by another worker), 2 when it claimed the tick but skipped the run
-- because the previous run of a unique job is still unfinished. A previous run marked
-- running by a worker whose heartbeat has expired counts as finished: that worker is dead,
-- its run will be taken over, and waiting for it would lose ticks.
-- Invariant: ZADD GT only moves a cron job's claim forward, and the claim and the enqueue
-- happen in one step, so every tick is enqueued at most once and no tick is claimed
-- without its run being written (or deliberately skipped).
local name, fire = ARGV[1], tonumber(ARGV[2])
local current = redis.call('ZSCORE', KEYS[1], name)
if current then
  current = tonumber(current)
  if current >= fire or ARGV[3] == '' or current ~= tonumber(ARGV[3]) then
    return 0
  end
elseif ARGV[3] ~= '' then
  return 0
end
redis.call('ZADD', KEYS[1], 'GT', 'CH', fire, name)
if ARGV[7] == '1' and KEYS[5] ~= KEYS[4] then
  local previous = redis.call('HMGET', KEYS[5], 'status', 'worker')
  local status = previous[1]
  if status == 'queued' or status == 'retrying' or status == 'scheduled' then
    return 2
  end
  if status == 'running' then
    local dead = ARGV[8] ~= '' and previous[2] == ARGV[8] and redis.call('EXISTS', KEYS[6]) == 0
    if not dead then
      return 2
    end
  end
end
if redis.call('EXISTS', KEYS[4]) == 0 then
  local entry = redis.call('XADD', KEYS[3], '*', 'j', ARGV[4])
  redis.call('HSET', KEYS[4], 'env', ARGV[5], 'status', 'queued', 'attempt', 1,
    'deliveries', 0, 'enqueued', ARGV[6], 'entry', entry)
end
redis.call('HSET', KEYS[2], name, ARGV[4])
return 1
