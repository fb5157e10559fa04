#!lua flags=allow-oom
-- progress.lua: store and announce how far a running job is.
-- KEYS[1] hash of the job, KEYS[2] events stream
-- ARGV[1] job id, ARGV[2] consumer, ARGV[3] stream entry id of the delivery,
--   ARGV[4] fraction done (0..1), ARGV[5] message, ARGV[6] sequence number of this report
--   within the delivery (1, 2, ...), ARGV[7] events cap
-- Returns 1 if stored, 0 if this delivery no longer runs the job (lease lost, aborted,
-- finished): a late report never overwrites a newer run's progress.
-- Repeat-safe: the delivery's entry and the report's sequence number are kept with the
-- progress; a report re-sent after a lost reply finds them stored and announces nothing
-- twice.
local job = redis.call('HMGET', KEYS[1], 'status', 'worker', 'entry', 'progress_seq')
if job[1] ~= 'running' or job[2] ~= ARGV[2] or job[3] ~= ARGV[3] then
  return 0
end
local seq = ARGV[3] .. ' ' .. ARGV[6]
if job[4] == seq then
  return 1
end
redis.call('HSET', KEYS[1], 'progress', ARGV[4], 'progress_message', ARGV[5],
  'progress_at', redis_now_text(), 'progress_seq', seq)
flush_events(KEYS[2], ARGV[7], {{ARGV[1], 'progress', tonumber(ARGV[4]), ARGV[5]}})
return 1
