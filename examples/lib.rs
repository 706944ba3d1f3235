//! Runnable examples of embedding MindSP; see the `[[example]]` entries:
//! `cargo run -p mindsp-examples --example embed_router` and
//! `cargo run -p mindsp-examples --example core_with_sqlite`.
