-- The tenant's shared CXone quota (src/cxone/quota.rs): one token bucket for every replica.
-- Times come from Redis's own clock (TIME), so the replicas' clocks do not matter.
--
-- KEYS[1] bucket hash: tokens, ts (ms), factor (share of the configured rate after 429s),
--         cut (ms of the last 429)
-- KEYS[2] pause: ms until which nobody sends (a 429's Retry-After)
-- KEYS[3] revocation demand: present while some replica has revocation calls waiting
-- KEYS[4] replicas: sorted set of replica ids by last heartbeat (ms)
--
-- take  rate burst want class reserve -> {granted, wait_ms, paused, rate_milli}
-- pause ms                            -> {0, wait_ms, 1, rate_milli}
-- beat  replica_id                    -> {replicas, 0, 0, 0}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local op = ARGV[1]

-- After a 429 the bucket runs at `factor` of the configured rate; five seconds on it climbs
-- back by 1 % of the rate per second.
local function factor(b)
  local f = tonumber(b[3]) or 1
  local cut = tonumber(b[4]) or 0
  if f < 1 then
    f = math.min(1, f + math.max(0, now - cut - 5000) * 0.00001)
  end
  return f
end

if op == 'take' then
  local rate = tonumber(ARGV[2])
  local burst = tonumber(ARGV[3])
  local want = tonumber(ARGV[4])
  local revoke = ARGV[5] == 'revoke'
  local reserve = tonumber(ARGV[6])
  if revoke then
    redis.call('SET', KEYS[3], '1', 'PX', 300)
  end
  local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'factor', 'cut')
  local f = factor(b)
  local pause = tonumber(redis.call('GET', KEYS[2]) or '0')
  if pause > now then
    return {0, math.ceil(pause - now), 1, math.floor(rate * f * 1000)}
  end
  rate = rate * f
  local tokens = tonumber(b[1])
  local ts = tonumber(b[2])
  if tokens == nil or ts == nil then
    tokens = burst
    ts = now
  end
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
  -- Housekeeping takes only what revocation leaves over while any replica has revocations
  -- waiting.
  local keep = 0
  if not revoke and redis.call('EXISTS', KEYS[3]) == 1 then
    keep = reserve
  end
  local grant = math.floor(tokens - keep)
  if grant > want then grant = want end
  if grant < 0 then grant = 0 end
  tokens = tokens - grant
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens),
    'ts', string.format('%.3f', now))
  redis.call('PEXPIRE', KEYS[1], 600000)
  if grant > 0 then
    return {grant, 0, 0, math.floor(rate * 1000)}
  end
  local wait = (keep + 1 - tokens) * 1000 / rate
  if keep > 0 then
    local ttl = redis.call('PTTL', KEYS[3])
    if ttl > 0 and ttl < wait then wait = ttl end
  end
  return {0, math.max(1, math.ceil(wait)), 0, math.floor(rate * 1000)}
elseif op == 'pause' then
  local rate = tonumber(ARGV[3])
  local untl = now + tonumber(ARGV[2])
  local pause = tonumber(redis.call('GET', KEYS[2]) or '0')
  local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'factor', 'cut')
  local f = factor(b)
  -- One cut per throttling episode: the 429s of requests already in flight do not compound.
  if now - (tonumber(b[4]) or 0) > 1000 then
    f = math.max(0.5, f * 0.9)
    redis.call('HSET', KEYS[1], 'factor', string.format('%.6f', f),
      'cut', string.format('%.3f', now))
  end
  if untl > pause then
    redis.call('SET', KEYS[2], string.format('%.0f', untl), 'PX', math.ceil(untl - now) + 1000)
    pause = untl
  end
  -- Nothing accrued during the pause comes out as a burst when it ends.
  redis.call('HSET', KEYS[1], 'tokens', '0', 'ts', string.format('%.3f', pause))
  redis.call('PEXPIRE', KEYS[1], 600000)
  return {0, math.ceil(pause - now), 1, math.floor(rate * f * 1000)}
elseif op == 'beat' then
  redis.call('ZADD', KEYS[4], now, ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - 5000)
  redis.call('PEXPIRE', KEYS[4], 60000)
  return {redis.call('ZCARD', KEYS[4]), 0, 0, 0}
end
return redis.error_reply('unknown quota operation')
