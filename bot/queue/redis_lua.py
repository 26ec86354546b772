"""Lua scripts of the Redis Streams transport: each state change of a job is one atomic script.

Keys under the prefix P (ARGV[1] of every script):
  P:jobs          stream of submitted jobs, consumer group "workers" (fields: id, job)
  P:waiting       zset of waiting job ids, score = arrival order (released jobs get 0: front of line)
  P:deadlines     zset of the same ids, score = deadline (unix time): SUBMIT ends those past it
  P:conv:<key>    zset of a conversation's waiting job ids (fairness); expires with its newest job's hash
  P:job:<id>      hash: conv, entry (stream id), attempt, deadline, nonce, cancelled, final, next (seq)
  P:events:<id>   stream of the job's events (field e = event JSON); expires after the job
  P:dead          stream of dead-lettered jobs, newest 1000 (fields: id, conv, persona, created_at, deliveries,
                  reason): never the messages, users' text that /forget-me must be able to erase
The `attempt` field fences workers: only the holder of the current attempt may publish, ack or release.
Only Redis 7.0 commands are used.
"""

from __future__ import annotations

_PRELUDE = """
local P = ARGV[1]
local WAITING = P .. ':waiting'
local DEADLINES = P .. ':deadlines'
local JOBS = P .. ':jobs'
local function meta(id) return P .. ':job:' .. id end
local function events(id) return P .. ':events:' .. id end
local function now()
  local clock = redis.call('TIME')
  return tonumber(clock[1]) + tonumber(clock[2]) / 1000000
end
local function done(id, reason)
  return cjson.encode({type = 'done', job_id = id, finish_reason = reason})
end
-- Append the job's final event unless it already has one.
local function finish(id, event, ttl)
  local m = meta(id)
  if redis.call('HGET', m, 'final') == '1' then return 0 end
  redis.call('XADD', events(id), '*', 'e', event)
  redis.call('HSET', m, 'final', '1')
  redis.call('EXPIRE', events(id), ttl)
  redis.call('EXPIRE', m, ttl)
  return 1
end
-- Take a job out of the line; 1 when it was waiting.
local function unwait(id)
  local conv = redis.call('HGET', meta(id), 'conv')
  if conv then redis.call('ZREM', P .. ':conv:' .. conv, id) end
  redis.call('ZREM', DEADLINES, id)
  return redis.call('ZREM', WAITING, id)
end
local function drop_entry(entry)
  redis.call('XACK', JOBS, 'workers', entry)
  redis.call('XDEL', JOBS, entry)
end
"""

# ARGV: P, id, conv, job_json, max_waiting, max_per_conv, supersede, ttl, deadline, nonce
# -> {position, 0} | {-1, depth} queue full | {-2, n} conversation full | {-3, 0} duplicate id
# The nonce is the submitting call's own: a resend of that call (a retry after its reply was lost)
# finds the job stored with it and answers with the job's place instead of "duplicate".
SUBMIT = _PRELUDE + """
local id, conv, job = ARGV[2], ARGV[3], ARGV[4]
local max_waiting, max_conv, ttl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[8])
local convkey = P .. ':conv:' .. conv
if redis.call('EXISTS', meta(id)) == 1 then
  if redis.call('HGET', meta(id), 'nonce') ~= ARGV[10] then return {-3, 0} end
  local rank = redis.call('ZRANK', WAITING, id)
  return {rank and rank + 1 or 1, 0}
end
-- Waiting jobs past their deadline end here, as a worker taking them would end them: the bot has given up
-- on them, so they must not hold places in line (their conversation's, the queue's) until a worker is free.
for _, old in ipairs(redis.call('ZRANGEBYSCORE', DEADLINES, '-inf', now())) do
  local entry = redis.call('HGET', meta(old), 'entry')
  unwait(old)
  if entry then
    drop_entry(entry)
    finish(old, done(old, 'deadline'), ttl)
  end
end
-- A waiting job whose hash expired (no worker read it in time) no longer counts: it must not hold
-- its conversation's places for good.
for _, old in ipairs(redis.call('ZRANGE', convkey, 0, -1)) do
  if redis.call('EXISTS', meta(old)) == 0 then
    redis.call('ZREM', convkey, old)
    redis.call('ZREM', DEADLINES, old)
    redis.call('ZREM', WAITING, old)
  end
end
if ARGV[7] == '1' then
  for _, old in ipairs(redis.call('ZRANGE', convkey, 0, -1)) do
    unwait(old)
    drop_entry(redis.call('HGET', meta(old), 'entry'))
    redis.call('HSET', meta(old), 'cancelled', '1')
    finish(old, done(old, 'superseded'), ttl)
  end
else
  local n = redis.call('ZCARD', convkey)
  if n >= max_conv then return {-2, n} end
end
local depth = redis.call('ZCARD', WAITING)
if depth >= max_waiting then return {-1, depth} end
local entry = redis.call('XADD', JOBS, '*', 'id', id, 'job', job)
local order = redis.call('INCR', P .. ':order')
redis.call('ZADD', WAITING, order, id)
redis.call('ZADD', convkey, order, id)
redis.call('ZADD', DEADLINES, ARGV[9], id)
redis.call('HSET', meta(id), 'conv', conv, 'entry', entry, 'attempt', 0, 'deadline', ARGV[9], 'nonce', ARGV[10])
redis.call('EXPIRE', meta(id), ttl)
-- The line lives as long as its newest job's hash: by then each id in it names a job that expired unread,
-- and nothing else would remove them (a worker passing such a job over cannot tell its conversation:
-- only the hash named it).
redis.call('EXPIRE', convkey, ttl)
-- Last in line: every other waiting job has a lower score (earlier order, or 0 when released).
return {depth + 1, 0}
"""

# ARGV: P, id, ttl -> 1 ended a waiting job, 2 flagged an in-flight one, 0 nothing to do
CANCEL = _PRELUDE + """
local id, ttl = ARGV[2], tonumber(ARGV[3])
local m = meta(id)
if redis.call('EXISTS', m) == 0 or redis.call('HGET', m, 'final') == '1' then return 0 end
redis.call('HSET', m, 'cancelled', '1')
if unwait(id) == 1 then
  drop_entry(redis.call('HGET', m, 'entry'))
  finish(id, done(id, 'cancelled'), ttl)
  return 1
end
return 2
"""

# Shared by TAKE and READ. ARGV: P, max_deliveries, ttl, dead_letter_message, ...
_TAKE_ONE = """
local max_deliveries, ttl, message = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local time_now = now()
-- A job read from the stream: its attempt number when it goes to the worker, or 0 when it was
-- finished here instead (cancelled, past its deadline, delivered too often, or already final).
local function take_one(id, entry, job)
  local m = meta(id)
  local result = 0
  -- unwait(id), reading the rest of the hash in the same call; conv is set whenever the hash exists.
  local f = redis.call('HMGET', m, 'conv', 'final', 'cancelled', 'deadline')
  if f[1] then redis.call('ZREM', P .. ':conv:' .. f[1], id) end
  redis.call('ZREM', DEADLINES, id)
  redis.call('ZREM', WAITING, id)
  if f[1] then
    local attempt = redis.call('HINCRBY', m, 'attempt', 1)
    if f[2] == '1' then
      result = 0
    elseif f[3] == '1' then
      finish(id, done(id, 'cancelled'), ttl)
    elseif f[4] and f[4] ~= '' and tonumber(f[4]) <= time_now then
      finish(id, done(id, 'deadline'), ttl)
    elseif attempt > max_deliveries then
      -- What an operator needs to look into it, not the job: its messages are users' text (about 20 KB a
      -- job) that /forget-me could not reach here, its stop strings name the participants. As many as
      -- the in-process queue keeps (base.MAX_DEAD_LETTERS).
      local j = cjson.decode(job)
      redis.call('XADD', P .. ':dead', 'MAXLEN', '~', 1000, '*', 'id', id, 'conv', f[1], 'persona', j.persona_id,
        'created_at', j.created_at, 'deliveries', attempt - 1, 'reason', message)
      finish(id, cjson.encode({type = 'error', job_id = id, kind = 'dead_letter', message = message}), ttl)
    else
      result = attempt
    end
  end
  if result == 0 then drop_entry(entry) end
  return result
end
"""

# ARGV: P, max_deliveries, ttl, dead_letter_message, then (id, entry, job_json) triples of reclaimed entries
# -> one attempt number (or 0) per entry
TAKE = _PRELUDE + _TAKE_ONE + """
local out = {}
for i = 5, #ARGV, 3 do
  out[#out + 1] = take_one(ARGV[i], ARGV[i + 1], ARGV[i + 2])
end
return out
"""

# ARGV: P, max_deliveries, ttl, dead_letter_message, consumer, count
# Reads new jobs for `consumer` and takes them in the same step, so a worker that waits with
# XREAD BLOCK pipelined before this script gets its jobs in a single round trip.
# -> {last_delivered_id, id, entry, job_json, attempt, id, entry, ...} (only delivered jobs)
READ = _PRELUDE + _TAKE_ONE + """
local out = {''}
local reply = redis.call('XREADGROUP', 'GROUP', 'workers', ARGV[5], 'COUNT', tonumber(ARGV[6]), 'STREAMS', JOBS, '>')
if reply then
  for _, item in ipairs(reply[1][2]) do
    local entry, fields = item[1], item[2]
    local id, job
    for k = 1, #fields, 2 do
      if fields[k] == 'id' then id = fields[k + 1] elseif fields[k] == 'job' then job = fields[k + 1] end
    end
    local attempt = take_one(id, entry, job)
    if attempt > 0 then
      out[#out + 1] = id
      out[#out + 1] = entry
      out[#out + 1] = job
      out[#out + 1] = attempt
    end
    out[1] = entry  -- the group's last delivered id is now the last entry read
  end
else
  local groups = redis.call('XINFO', 'GROUPS', JOBS)
  for _, group in ipairs(groups) do
    for k = 1, #group, 2 do
      if group[k] == 'name' and group[k + 1] ~= 'workers' then break end
      if group[k] == 'last-delivered-id' then out[1] = group[k + 1] end
    end
  end
end
return out
"""

# ARGV: P, ttl, then (id, attempt, entry, event_json, is_final, seq) sextuples, in order; seq is -1 for
# an event without one (the final event)
# -> one value per event: 1 published, 0 fenced (not this worker's job any more, or already final)
# A published final event also acks the job (what COMPLETE would do next), saving the worker a round trip.
# The job's `next` field is the seq after its last published delta: a resend of the same call (a retry
# after its reply was lost) skips the deltas it already added, and the final event is added once anyway.
PUBLISH = _PRELUDE + """
local ttl = tonumber(ARGV[2])
local out = {}
local state = {}      -- id -> {attempt, final, next seq}, read once per job and kept up to date here
local published = {}  -- ids whose event stream got an event (their TTL and next seq are set once, after the loop)
for i = 3, #ARGV, 6 do
  local id = ARGV[i]
  local m = meta(id)
  local f = state[id]
  if not f then
    f = redis.call('HMGET', m, 'attempt', 'final', 'next')
    f[3] = tonumber(f[3]) or 0
    state[id] = f
  end
  local seq = tonumber(ARGV[i + 5])
  if f[1] ~= ARGV[i + 1] or f[2] == '1' then
    out[#out + 1] = 0
  elseif seq >= 0 and seq < f[3] then
    out[#out + 1] = 1
  else
    redis.call('XADD', events(id), '*', 'e', ARGV[i + 3])
    published[id] = true
    if seq >= 0 then f[3] = seq + 1 end
    if ARGV[i + 4] == '1' then
      redis.call('HSET', m, 'final', '1')
      redis.call('EXPIRE', m, ttl)
      drop_entry(ARGV[i + 2])
      f[2] = '1'
    end
    out[#out + 1] = 1
  end
end
for id in pairs(published) do
  redis.call('HSET', meta(id), 'next', state[id][3])
  redis.call('EXPIRE', events(id), ttl)
end
return out
"""

# ARGV: P, id, attempt, entry, ttl, incomplete_event_json -> 1 acked, 0 fenced
COMPLETE = _PRELUDE + """
local id = ARGV[2]
if redis.call('HGET', meta(id), 'attempt') ~= ARGV[3] then return 0 end
finish(id, ARGV[6], tonumber(ARGV[5]))
drop_entry(ARGV[4])
return 1
"""

# ARGV: P, id, attempt, entry, consumer -> 1 handed back, 0 fenced
# The entry stays pending but looks long idle, so the next XAUTOCLAIM of any worker takes it.
RELEASE = _PRELUDE + """
local id = ARGV[2]
local f = redis.call('HMGET', meta(id), 'attempt', 'final', 'deadline')
if f[1] ~= ARGV[3] or f[2] == '1' then return 0 end
redis.call('XCLAIM', JOBS, 'workers', ARGV[5], 0, ARGV[4], 'IDLE', 31536000000, 'JUSTID')
redis.call('ZADD', WAITING, 0, id)
if f[3] and f[3] ~= '' then redis.call('ZADD', DEADLINES, f[3], id) end
return 1
"""

# ARGV: P, consumer, then (id, attempt, entry) triples -> ids this worker no longer owns
HEARTBEAT = _PRELUDE + """
local lost = {}
for i = 3, #ARGV, 3 do
  local id = ARGV[i]
  if redis.call('HGET', meta(id), 'attempt') == ARGV[i + 1] then
    redis.call('XCLAIM', JOBS, 'workers', ARGV[2], 0, ARGV[i + 2], 'JUSTID')
  else
    lost[#lost + 1] = id
  end
end
return lost
"""

# ARGV: P, min_idle_ms -> number of consumers removed
# Forgets consumers (workers that died) with nothing pending, idle at least min_idle_ms. Checked and
# deleted in one step: DELCONSUMER would drop pending entries, and a live worker is recreated by its
# next read anyway.
PRUNE = _PRELUDE + """
local removed = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', JOBS, 'workers')) do
  local info = {}
  for k = 1, #consumer, 2 do info[consumer[k]] = consumer[k + 1] end
  if info['pending'] == 0 and info['idle'] >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', JOBS, 'workers', info['name'])
    removed = removed + 1
  end
end
return removed
"""
