#!lua flags=allow-oom
-- renew.lua: renew the leases of this consumer's in-flight jobs.
-- KEYS[1] stream, KEYS[1 + i] hash of job i
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] lease (ms), ARGV[3 + i] entry token of job i
--   (any lane)
-- Returns {lost, aborted}: entry ids this consumer no longer owns (taken over after an
-- expired lease), and entry ids of jobs aborted meanwhile (a backstop for an abort message
-- the worker missed while disconnected).
-- Invariant: XCLAIM with min-idle 0 would steal an entry from whoever owns it now, so each
-- entry's owner is checked first (one XPENDING per entry: however long the pending list,
-- no window of it can miss an entry); JUSTID resets the idle time without counting a
-- delivery. A concurrency slot the job holds is extended to the end of the new lease.
-- Repeat-safe: claiming an entry one owns again only resets its idle time again.
local group, consumer = ARGV[1], ARGV[2]
local base = string.sub(KEYS[1], 1, #KEYS[1] - #'stream')
local expiry = redis_now() + tonumber(ARGV[3])
local claims, order = {}, {}
local lost, aborted = {}, {}
for i = 1, #KEYS - 1 do
  local token = ARGV[3 + i]
  local s, entry = untoken(KEYS[1], token)
  if #redis.call('XPENDING', s, group, entry, entry, 1, consumer) > 0 then
    local claim = claims[s]
    if not claim then
      claim = {s, group, consumer, 0}
      claims[s], order[#order + 1] = claim, s
    end
    claim[#claim + 1] = entry
    local job = redis.pcall('HMGET', KEYS[1 + i], 'status', 'slot')
    if not job.err and job[1] == 'aborted' then
      aborted[#aborted + 1] = token
    elseif not job.err and job[2] then
      local slots = base .. 'conc:' .. job[2]
      redis.call('ZADD', slots, 'XX', expiry, string.sub(KEYS[1 + i], #base + #'job:' + 1))
      redis.call('PEXPIRE', slots, tonumber(ARGV[3]) * 2 + 60000)
    end
  else
    lost[#lost + 1] = token
  end
end
for _, s in ipairs(order) do
  local claim = claims[s]
  claim[#claim + 1] = 'JUSTID'
  redis.call('XCLAIM', unpack(claim))
end
return {lost, aborted}
