//! What the Redis tests read of a deployment's keys.

use fred::interfaces::LuaInterface;

/// How many nodes under `prefix` are marked as stopped cleanly (`<prefix>left`). Read
/// by a script: while Redis pauses writes, it waits for the pause's end.
pub(crate) async fn clean_stop_marks(client: &fred::clients::Client, prefix: &str) -> i64 {
    client
        .eval(
            "return redis.call('SCARD', ARGV[1])",
            Vec::<String>::new(),
            vec![format!("{prefix}left")],
        )
        .await
        .unwrap()
}
