//! Mounting the MindSP API inside an application that already has its own routes.
//!
//! `cargo run -p mindsp-examples --example embed_router`, then
//! `curl -s localhost:3000/` and `curl -s localhost:3000/chat/healthz`.

use axum::Router;
use axum::routing::get;
use mindsp_server::{AppState, HttpConfig, router, serve, shutdown_signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Your own storage choice: here a SQLite file; a `postgres://` URL works the same.
    let store = mindsp_store::open("sqlite://embedded-example.db").await?;
    // Seed something to log in with (skipped when it already exists).
    mindsp_server::demo::seed(store.clone()).await?;

    // In production the secret comes from your configuration, never from the source.
    let secret = std::env::var("MINDSP_JWT_SECRET")
        .unwrap_or_else(|_| "example-only-secret-change-me-0123456789".into());
    let mindsp = router(AppState::new(
        store,
        &HttpConfig::with_secret(secret.as_bytes()),
    ));

    // The existing application: its own routes, with MindSP under /chat.
    let app = Router::new()
        .route(
            "/",
            get(|| async { "Logiciel de gestion opérationnelle — accueil" }),
        )
        .nest("/chat", mindsp);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    println!(
        "try: curl -s -X POST localhost:3000/chat/api/auth/login -H 'content-type: application/json' \\"
    );
    println!(
        "       -d '{{\"tenant\":\"sdis13\",\"email\":\"admin@sdis13.fr\",\"password\":\"Password123!\"}}'"
    );
    serve(
        listener,
        app,
        shutdown_signal(),
        std::time::Duration::from_secs(5),
    )
    .await?;
    Ok(())
}
