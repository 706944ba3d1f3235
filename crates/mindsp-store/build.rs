//! `sqlx::migrate!` embeds the migration files when the crate compiles; this makes cargo
//! compile it again when a migration is added or changed.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
