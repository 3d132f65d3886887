-- 0003: drop the index of every agent by last beat. Every agent is either
-- active or finished, both indexes scored by last beat, so listings merge
-- those two and beats no longer keep a third copy.
-- KEYS[1] = {prefix}:agents:by-beat
redis.call('DEL', KEYS[1])
return 1
