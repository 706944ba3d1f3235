//! The `mindsp-server` binary; everything lives in the library so tests and embedders
//! reach the same code.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    mindsp_server::cli::run().await
}
