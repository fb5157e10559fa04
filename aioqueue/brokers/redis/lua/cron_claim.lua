-- cron_claim.lua: claim one cron tick and enqueue its run, exactly once across workers.
-- KEYS[1] cron zset (name -> last claimed fire ms), KEYS[2] cron-runs hash (name -> job id
--   of the last run enqueued), KEYS[3] cron-claims hash (name -> '<fire ms> <answer>
--   <claimer>' of the last claim), KEYS[4] stream, KEYS[5] hash of the new run's job,
--   KEYS[6] hash of the previous run's job (KEYS[5] again when there is none),
--   KEYS[7] events stream
-- ARGV[1] cron job name, ARGV[2] fire time (ms on Redis's clock), ARGV[3] job id of the
--   run ('cron:<name>:<fire ms>'), ARGV[4] encoded envelope, ARGV[5] '1' if the job is
--   unique (a run never starts beside the previous one), ARGV[6] lease (ms),
--   ARGV[7] consumer group, ARGV[8] job id of the previous run as the caller read it from
--   KEYS[2] ('' if none), ARGV[9] claimer (an id of the calling broker), ARGV[10] events
--   cap, ARGV[11] the run's priority ('0': the default lane)
-- Returns one of:
--   'claimed'  this claimer claimed the tick and enqueued its run
--   'overlap'  this claimer claimed the tick and skipped its run: the previous run of a
--              unique job is unfinished
--   'taken'    another claimer claimed this tick or a later one
--   'early'    the tick is later than Redis's clock: nothing written, claim it when due
--   'stale'    the previous run is no longer the one the caller read: nothing written,
--              read it again and call again
-- Invariants: the claim only moves forward (ZADD GT), and the claim and the enqueue are one
-- step, so every tick is enqueued at most once and none is claimed without its run being
-- written or deliberately skipped. Ticks are decided on Redis's clock alone: no worker,
-- whatever its clock says, can claim a tick before it is due, so none can block the others.
-- Unfinished: a previous run that is queued, scheduled or retrying, or running with its
-- stream entry pending and idle for less than the lease. An entry no longer pending, or idle
-- for the lease or longer, belongs to a worker that is gone, by the same rule as lease
-- takeover (XAUTOCLAIM): the run will be taken over, and waiting for it would lose ticks.
-- Repeat-safe: the answer of the last claim is stored with its claimer, so the same call
-- re-sent after a lost reply finds its own claim and answers 'claimed' or 'overlap' again,
-- writing nothing; a claim from anyone else answers 'taken'. Calls that wrote nothing
-- ('taken', 'early', 'stale') are repeat-safe as they are.
local name, fire, id = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local claimer = ARGV[9]
local current = tonumber(redis.call('ZSCORE', KEYS[1], name))
if current and current >= fire then
  if current == fire then
    local last = redis.call('HGET', KEYS[3], name)
    if last then
      local at, answer, by = string.match(last, '^(%d+) (%a+) (.+)$')
      if tonumber(at) == fire and by == claimer then
        return answer
      end
    end
  end
  return 'taken'
end
local now = redis_now()
if fire > now then
  return 'early'
end
local previous = ''
if ARGV[5] == '1' then
  previous = redis.call('HGET', KEYS[2], name) or ''
  if previous ~= ARGV[8] then
    return 'stale'
  end
end

local function unfinished(key)
  local job = redis.call('HMGET', key, 'status', 'entry')
  local status, entry = job[1], job[2]
  if status == 'queued' or status == 'scheduled' or status == 'retrying' then
    return true
  end
  if status ~= 'running' or not entry then
    return false
  end
  -- One entry of the group's pending list: {{entry, consumer, idle ms, deliveries}}.
  local s, raw = untoken(KEYS[4], entry)
  local pending = redis.pcall('XPENDING', s, ARGV[7], raw, raw, 1)
  if type(pending) ~= 'table' or pending.err or #pending == 0 then
    return false
  end
  return tonumber(pending[1][3]) < tonumber(ARGV[6])
end

redis.call('ZADD', KEYS[1], 'GT', fire, name)
if previous ~= '' and previous ~= id and unfinished(KEYS[6]) then
  redis.call('HSET', KEYS[3], name, ARGV[2] .. ' overlap ' .. claimer)
  return 'overlap'
end
if redis.call('EXISTS', KEYS[5]) == 0 then
  local entry = push(KEYS[4], id, ARGV[11])
  redis.call('HSET', KEYS[5], 'env', ARGV[4], 'status', 'queued', 'enqueued', now,
    'entry', entry)
  if ARGV[11] ~= '0' then
    redis.call('HSET', KEYS[5], 'prio', ARGV[11])
    add_lane(KEYS[4], ARGV[11])
  end
  flush_events(KEYS[7], ARGV[10], {{id, 'enqueued', 'queued'}})
end
redis.call('HSET', KEYS[2], name, id)
redis.call('HSET', KEYS[3], name, ARGV[2] .. ' claimed ' .. claimer)
return 'claimed'
