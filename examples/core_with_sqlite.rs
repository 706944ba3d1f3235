//! Using the core with the SQLite store and no server at all: create a department,
//! two firefighters, a group, exchange messages, read the history and search it.
//!
//! `cargo run -p mindsp-examples --example core_with_sqlite`

use mindsp_core::model::{NewUser, Role, SeqWindow};
use mindsp_core::ports::Store;
use mindsp_core::{Actor, Limits, Messaging};
use mindsp_store::sqlite::{SqliteConfig, SqliteStore};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let store = std::sync::Arc::new(SqliteStore::open(SqliteConfig::memory()).await?);
    let svc = Messaging::new(store.clone(), Limits::default());

    let sdis = store.create_tenant("sdis84", "SDIS 84 — Vaucluse").await?;
    // Users are created inside a unit of work scoped to the tenant. Password hashing
    // belongs to your authentication layer; this example has none.
    let mut tx = svc.store().begin(sdis.id).await?;
    let mut actors = Vec::new();
    for (email, name, role) in [
        (
            "chef@sdis84.fr",
            "Ltn Claire Morel — CIS Avignon",
            Role::Officer,
        ),
        (
            "sapeur@sdis84.fr",
            "Sap Hugo Perrin — CIS Avignon",
            Role::Member,
        ),
    ] {
        let u = tx
            .insert_user(&NewUser {
                email: email.into(),
                display_name: name.into(),
                role,
                password_hash: String::new(),
            })
            .await?;
        actors.push(Actor {
            tenant_id: sdis.id,
            user_id: u.id,
            role,
        });
    }
    tx.commit().await?;
    let (chef, sapeur) = (actors[0], actors[1]);

    let group = svc
        .create_group(&chef, "CIS Avignon — feux de forêt", &[sapeur.user_id])
        .await?;
    svc.send(
        &chef,
        group.id,
        "Risque incendie sévère demain : CCF armés dès 10 h.",
        None,
    )
    .await?;
    svc.send(
        &sapeur,
        group.id,
        "Bien reçu, je serai au centre à 9 h 30.",
        None,
    )
    .await?;

    for m in svc
        .history(&sapeur, group.id, SeqWindow::Latest, None)
        .await?
    {
        println!("#{} {}", m.seq, m.content);
    }
    let hits = svc.search(&sapeur, "incendies", None, 0, None).await?;
    println!("search « incendies »: {} result(s)", hits.len());
    let unread = svc.list_conversations(&sapeur, None, None).await?[0].unread_count;
    println!("unread for the sapeur: {unread}");
    Ok(())
}
