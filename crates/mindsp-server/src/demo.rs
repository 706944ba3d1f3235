//! Demo data for `serve --demo`: the SDIS 13 with a dozen firefighters of several
//! stations and a few conversations, so a first run has something to show.

use std::sync::Arc;

use mindsp_core::model::{NewUser, Role};
use mindsp_core::ports::Store;
use mindsp_core::service::create_user_in;
use mindsp_core::{Actor, Limits, Messaging, Result};

use crate::auth::hash_password_blocking;

/// Login of the demo administrator.
pub const DEMO_ADMIN_EMAIL: &str = "admin@sdis13.fr";
/// Password of every demo account.
pub const DEMO_PASSWORD: &str = "Password123!";
/// Slug of the demo tenant.
pub const DEMO_TENANT: &str = "sdis13";

const PEOPLE: &[(&str, &str, Role)] = &[
    (
        "julien.martin",
        "Sgt Julien Martin — CIS Aix-en-Provence",
        Role::Officer,
    ),
    (
        "sophie.bernard",
        "Ltn Sophie Bernard — CIS Aix-en-Provence",
        Role::Officer,
    ),
    (
        "karim.benali",
        "Cpl Karim Benali — CIS Aix-en-Provence",
        Role::Member,
    ),
    (
        "lucie.roux",
        "Sap Lucie Roux — CIS Aix-en-Provence",
        Role::Member,
    ),
    (
        "thomas.girard",
        "Adj Thomas Girard — CS Marseille-Nord",
        Role::Officer,
    ),
    (
        "nadia.mercier",
        "Cch Nadia Mercier — CS Marseille-Nord",
        Role::Member,
    ),
    (
        "antoine.fabre",
        "Sap Antoine Fabre — CS Marseille-Nord",
        Role::Member,
    ),
    (
        "camille.blanc",
        "Sch Camille Blanc — CIS Istres",
        Role::Member,
    ),
    (
        "mathieu.faure",
        "Cne Mathieu Faure — Groupement Ouest",
        Role::Officer,
    ),
    ("elodie.garnier", "Inf Élodie Garnier — SSSM", Role::Member),
    (
        "pierre.chevalier",
        "Adc Pierre Chevalier — CTA-CODIS",
        Role::Officer,
    ),
    (
        "ines.lambert",
        "Sap Inès Lambert — CIS Istres",
        Role::Member,
    ),
];

/// Creates the demo tenant if no tenant `sdis13` exists yet. Returns whether it did.
pub async fn seed(store: Arc<dyn Store>) -> Result<bool> {
    if store.tenant_by_slug(DEMO_TENANT).await?.is_some() {
        return Ok(false);
    }
    let limits = Limits::default();
    let tenant = store
        .create_tenant(DEMO_TENANT, "SDIS 13 — Bouches-du-Rhône")
        .await?;
    let mut tx = store.begin(tenant.id).await?;
    let admin = create_user_in(
        tx.as_mut(),
        NewUser {
            email: DEMO_ADMIN_EMAIL.into(),
            display_name: "Cdt Marc Dupont — État-major".into(),
            role: Role::Admin,
            password_hash: hash_password_blocking(DEMO_PASSWORD.into()).await?,
        },
        &limits,
    )
    .await?;
    let mut users = Vec::new();
    for (login, name, role) in PEOPLE {
        let u = create_user_in(
            tx.as_mut(),
            NewUser {
                email: format!("{login}@sdis13.fr"),
                display_name: (*name).into(),
                role: *role,
                password_hash: hash_password_blocking(DEMO_PASSWORD.into()).await?,
            },
            &limits,
        )
        .await?;
        users.push(u);
    }
    tx.commit().await?;

    let svc = Messaging::new(store, limits);
    let actor = |u: &mindsp_core::model::User| Actor {
        tenant_id: u.tenant_id,
        user_id: u.id,
        role: u.role,
    };
    let admin = actor(&admin);
    let a: Vec<Actor> = users.iter().map(actor).collect();

    let aix = svc
        .create_group(
            &a[1],
            "CIS Aix-en-Provence — garde",
            &[a[0].user_id, a[2].user_id, a[3].user_id, admin.user_id],
        )
        .await?;
    for (who, text) in [
        (
            1,
            "Bonjour à tous, garde de 24 h à partir de 7 h demain. FPT et VSAV armés.",
        ),
        (0, "Reçu. Je prends le VSAV avec Karim."),
        (2, "Ok pour moi. Vérification ARI faite ce matin."),
        (3, "Je serai là à 6 h 45 pour la relève."),
        (1, "Rappel : manœuvre échelle jeudi 14 h 00 au centre."),
    ] {
        svc.send(&a[who], aix.id, text, None).await?;
    }

    let nord = svc
        .create_group(
            &a[4],
            "CS Marseille-Nord — équipe FPT",
            &[a[5].user_id, a[6].user_id, a[8].user_id],
        )
        .await?;
    for (who, text) in [
        (4, "Feu de véhicule sur l'A7, retour au centre vers 16 h."),
        (
            5,
            "Bien reçu. Le FPT a besoin d'un plein avant la prochaine sortie.",
        ),
        (6, "Je m'en occupe en rentrant."),
        (
            8,
            "Merci à l'équipe pour l'intervention de ce matin, bon travail.",
        ),
    ] {
        svc.send(&a[who], nord.id, text, None).await?;
    }

    let fmpa = svc
        .create_group(
            &a[8],
            "FMPA secours routier — Groupement Ouest",
            &[a[0].user_id, a[7].user_id, a[11].user_id, a[4].user_id],
        )
        .await?;
    for (who, text) in [
        (
            8,
            "FMPA désincarcération samedi 9 h 00 au plateau technique d'Istres.",
        ),
        (7, "Présente. Faut-il prévoir les tenues de feu ?"),
        (8, "Oui, tenue complète et gants de désincarcération."),
        (11, "Présente aussi."),
    ] {
        svc.send(&a[who], fmpa.id, text, None).await?;
    }

    let (direct, _) = svc.open_direct(&admin, a[10].user_id).await?;
    for (who, text) in [
        (
            &admin,
            "Pierre, peux-tu me faire le point sur l'activité du CTA cette nuit ?",
        ),
        (
            &a[10],
            "34 appels, 12 engagements dont 2 feux d'habitation. Rien de grave.",
        ),
    ] {
        svc.send(who, direct.id, text, None).await?;
    }
    let (direct, _) = svc.open_direct(&a[9], a[3].user_id).await?;
    svc.send(
        &a[9],
        direct.id,
        "Lucie, ta visite médicale d'aptitude est prévue mardi 3 mars à 10 h 00.",
        None,
    )
    .await?;
    Ok(true)
}
