//! Versioned keyspace migrations (`migrations/*.lua`).
//!
//! `serve` applies pending migrations at start and `attune-telemetry
//! migrate` applies them on demand. A lock key (`SET NX PX`) serializes
//! runners, and each migration is applied by one script that first checks
//! and then records its version in the same atomic step, so two replicas
//! starting together apply each migration exactly once even if the lock
//! expires under one of them.

use std::time::Duration;

use chrono::Utc;

use crate::engine::redis::RedisEngine;
use crate::engine::{EngineError, EngineResult};
use crate::types::rfc3339;

/// One migration: a version, a name, and its Lua body.
pub struct Migration {
    pub version: &'static str,
    pub name: &'static str,
    script: &'static str,
    /// The migration's own keys, from the deployment's key builder.
    keys: fn(&crate::engine::keys::Keys) -> Vec<String>,
    /// The migration's own arguments.
    args: fn() -> Vec<String>,
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: "0001",
        name: "metadata",
        script: include_str!("../migrations/0001_metadata.lua"),
        keys: |k| vec![k.sub("meta")],
        args: || vec![rfc3339(Utc::now())],
    },
    Migration {
        version: "0002",
        name: "user_hmac_secret",
        script: include_str!("../migrations/0002_user_hmac_secret.lua"),
        keys: |k| vec![k.user_hmac_secret()],
        args: || vec![hex::encode(rand::random::<[u8; 32]>())],
    },
    Migration {
        version: "0003",
        name: "drop_agents_by_beat",
        script: include_str!("../migrations/0003_drop_agents_by_beat.lua"),
        keys: |k| vec![k.sub("agents:by-beat")],
        args: Vec::new,
    },
];

/// Wraps a migration so that checking, applying and recording its version
/// are one atomic step. KEYS[1] = applied hash, KEYS[2] = log,
/// ARGV[1] = version, ARGV[2] = applied-at; the migration's own keys and
/// arguments follow and are what its body sees as `KEYS` and `ARGV`.
const WRAPPER: &str = r#"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
local applied, log, version, at = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local function body(KEYS, ARGV)
__BODY__
end
body({ unpack(KEYS, 3) }, { unpack(ARGV, 3) })
redis.call('HSET', applied, version, at)
redis.call('RPUSH', log, version .. ' ' .. at)
return 1
"#;

/// Applies every pending migration; returns the versions applied by this call.
pub async fn run(engine: &RedisEngine) -> EngineResult<Vec<&'static str>> {
    let lock_key = engine.keys.migrations_lock();
    let token = hex::encode(rand::random::<[u8; 16]>());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut conn = engine.conn();
    // Take the lock, waiting for another runner to finish.
    loop {
        let acquired: Option<String> = engine
            .run(
                redis::cmd("SET")
                    .arg(&lock_key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(30_000)
                    .query_async(&mut conn),
            )
            .await?;
        if acquired.is_some() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(EngineError::Unavailable(
                "another runner has held the migration lock for 30 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let result = apply_all(engine).await;
    // Release the lock only if it is still ours.
    let release = redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
    );
    let _: EngineResult<i64> = engine
        .run(release.key(&lock_key).arg(&token).invoke_async(&mut conn))
        .await;
    result
}

async fn apply_all(engine: &RedisEngine) -> EngineResult<Vec<&'static str>> {
    let mut applied = Vec::new();
    let mut conn = engine.conn();
    for migration in MIGRATIONS {
        let script = redis::Script::new(&WRAPPER.replace("__BODY__", migration.script));
        let mut invocation = script.prepare_invoke();
        invocation
            .key(engine.keys.migrations())
            .key(engine.keys.migrations_log())
            .arg(migration.version)
            .arg(rfc3339(Utc::now()));
        for key in (migration.keys)(&engine.keys) {
            invocation.key(key);
        }
        for arg in (migration.args)() {
            invocation.arg(arg);
        }
        let done: i64 = engine.run(invocation.invoke_async(&mut conn)).await?;
        if done == 1 {
            tracing::info!(
                version = migration.version,
                name = migration.name,
                "applied migration"
            );
            applied.push(migration.version);
        }
    }
    Ok(applied)
}
