-- 0002: the secret that keys the HMAC of usage `user_id`s. Created once and
-- shared by every replica, so one user hashes the same everywhere; never
-- replaced, or earlier hashes would stop matching.
-- KEYS[1] = {prefix}:secret:user-hmac   ARGV[1] = 32 random bytes, hex
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return 1
