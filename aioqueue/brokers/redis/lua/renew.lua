#!lua flags=allow-oom
-- renew.lua: renew the leases of this consumer's in-flight jobs.
-- KEYS[1] stream, KEYS[1 + i] hash of job i
-- ARGV[1] group, ARGV[2] consumer, ARGV[2 + i] stream entry id of job i
-- Returns {lost, aborted}: entry ids this consumer no longer owns (taken over after an
-- expired lease), and entry ids of jobs aborted meanwhile (a backstop for an abort message
-- the worker missed while disconnected).
-- Invariant: XCLAIM with min-idle 0 would steal an entry from whoever owns it now, so each
-- entry's owner is checked first (one XPENDING per entry: however long the pending list,
-- no window of it can miss an entry); JUSTID resets the idle time without counting a
-- delivery. Repeat-safe: claiming an entry one owns again only resets its idle time again.
local group, consumer = ARGV[1], ARGV[2]
local claim = {KEYS[1], group, consumer, 0}
local lost, aborted = {}, {}
for i = 1, #KEYS - 1 do
  local entry = ARGV[2 + i]
  if #redis.call('XPENDING', KEYS[1], group, entry, entry, 1, consumer) > 0 then
    claim[#claim + 1] = entry
    if redis.pcall('HGET', KEYS[1 + i], 'status') == 'aborted' then
      aborted[#aborted + 1] = entry
    end
  else
    lost[#lost + 1] = entry
  end
end
if #claim > 4 then
  claim[#claim + 1] = 'JUSTID'
  redis.call('XCLAIM', unpack(claim))
end
return {lost, aborted}
