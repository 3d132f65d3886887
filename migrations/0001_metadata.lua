-- 0001: record the keyspace's layout version and creation time.
-- KEYS[1] = {prefix}:meta   ARGV[1] = now (RFC 3339)
redis.call('HSETNX', KEYS[1], 'created_at', ARGV[1])
redis.call('HSET', KEYS[1], 'layout', '1')
return 1
