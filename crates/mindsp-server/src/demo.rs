//! Demo data for `serve --demo`: the SDIS 13 with a dozen firefighters of several
//! stations, a few conversations and 30 training sessions (FMPA) over the coming
//! weeks, so a first run has something to show.

use std::sync::Arc;

use chrono::{DateTime, Duration as TimeDelta, Timelike, Utc};
use mindsp_core::model::{NewUser, Role};
use mindsp_core::ports::Store;
use mindsp_core::service::create_user_in;
use mindsp_core::training::{NewSession, Training};
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

/// Training sessions of the demo: (kind, title, location, duration in hours).
const SESSIONS: &[(&str, &str, &str, i64)] = &[
    (
        "incendie",
        "Feu de local en milieu clos — attaque et ventilation",
        "Plateau technique de Vitrolles",
        4,
    ),
    (
        "ari",
        "Manœuvre ARI en milieu enfumé",
        "Caisson d'observation du CIS Aix-en-Provence",
        3,
    ),
    (
        "secours_routier",
        "Désincarcération sur véhicule électrique",
        "Plateau technique d'Istres",
        4,
    ),
    (
        "secours_a_personne",
        "Recyclage PSE2 — hémorragies et garrots",
        "CIS Aix-en-Provence, salle de formation",
        3,
    ),
    (
        "risques_chimiques",
        "Fuite de chlore : reconnaissance et périmètre",
        "Zone industrielle de Fos-sur-Mer",
        4,
    ),
    (
        "sauvetage_aquatique",
        "Sauvetage en eaux vives — lancer de corde",
        "Base nautique de Martigues",
        3,
    ),
    (
        "conduite_engins",
        "Conduite tout-terrain CCF",
        "Piste DFCI du massif de l'Étoile",
        4,
    ),
    (
        "incendie",
        "Feux de forêt — établissement en ligne",
        "Massif de la Sainte-Victoire, piste CCF",
        5,
    ),
    (
        "secours_routier",
        "Stabilisation et calage de poids lourd",
        "Plateau technique d'Istres",
        4,
    ),
    (
        "secours_a_personne",
        "Arrêt cardiaque : RCP et DAE en équipe",
        "CS Marseille-Nord, salle de sport",
        2,
    ),
    (
        "ari",
        "Contrôle et entretien des ARI",
        "CS Marseille-Nord, atelier",
        2,
    ),
    (
        "incendie",
        "Feu de parking souterrain",
        "Parking du centre commercial de Plan-de-Campagne",
        4,
    ),
    (
        "risques_chimiques",
        "Décontamination d'urgence",
        "CIS Istres, aire de lavage",
        3,
    ),
    (
        "sauvetage_aquatique",
        "Plongée : recherche en milieu portuaire",
        "Port de la Pointe Rouge",
        4,
    ),
    (
        "conduite_engins",
        "Mise en œuvre de l'échelle aérienne",
        "CIS Aix-en-Provence, cour",
        3,
    ),
    (
        "secours_a_personne",
        "Bilan et transmission au CRRA 15",
        "CTA-CODIS, salle de crise",
        2,
    ),
    (
        "incendie",
        "Feu d'habitation : sauvetages par l'extérieur",
        "Tour d'entraînement de Vitrolles",
        4,
    ),
    (
        "secours_routier",
        "Accident multi-victimes sur autoroute",
        "Aire de l'Arbois, A51",
        5,
    ),
    (
        "ari",
        "Recherche de victimes en fumées froides",
        "Caisson d'observation du CIS Aix-en-Provence",
        3,
    ),
    (
        "risques_chimiques",
        "Transport de matières dangereuses : plaques et codes",
        "CIS Istres, salle de cours",
        2,
    ),
    (
        "sauvetage_aquatique",
        "Sauvetage en mer depuis la plage",
        "Plage du Prado, Marseille",
        3,
    ),
    (
        "conduite_engins",
        "Conduite d'urgence du VSAV",
        "Circuit du Castellet",
        6,
    ),
    (
        "incendie",
        "Feu de navire à quai",
        "Grand port maritime de Marseille, quai 24",
        5,
    ),
    (
        "secours_a_personne",
        "Accouchement inopiné",
        "SSSM, salle de simulation",
        2,
    ),
    (
        "secours_routier",
        "Désincarcération : techniques de la porte arrière",
        "Plateau technique d'Istres",
        4,
    ),
    (
        "risques_chimiques",
        "Détection de gaz : explosimètre et toximètre",
        "CIS Istres, atelier",
        2,
    ),
    (
        "ari",
        "Parcours ARI chronométré",
        "Tour d'entraînement de Vitrolles",
        3,
    ),
    (
        "sauvetage_aquatique",
        "Crue éclair : évacuation en barque",
        "Berges de l'Huveaune, Aubagne",
        4,
    ),
    (
        "conduite_engins",
        "Manœuvre de la motopompe remorquable",
        "CS Marseille-Nord, cour",
        2,
    ),
    (
        "incendie",
        "Feux d'entrepôt : alimentation et lances canon",
        "Zone logistique de Miramas",
        5,
    ),
];

/// Adds the demo's 30 training sessions, spread over the next six weeks, each
/// organised by an officer with a team invited. Invitations, reminders and their
/// e-mails follow as for any session. Run once, right after [`seed`] created the
/// tenant.
pub async fn seed_sessions(store: Arc<dyn Store>, training: &Training) -> Result<usize> {
    let Some(tenant) = store.tenant_by_slug(DEMO_TENANT).await? else {
        return Ok(0);
    };
    let mut tx = store.read(tenant.id).await?;
    let users = tx.list_users(None, 100).await?;
    drop(tx);
    let officers: Vec<&mindsp_core::model::User> =
        users.iter().filter(|u| u.role != Role::Member).collect();
    if officers.is_empty() {
        return Ok(0);
    }
    // Tomorrow at 07:00 UTC (08:00 or 09:00 in Marseille), then one session every
    // one or two days, at 07:00 or 12:00 UTC.
    let base: DateTime<Utc> = (Utc::now() + TimeDelta::days(1))
        .with_hour(7)
        .and_then(|t| t.with_minute(0))
        .and_then(|t| t.with_second(0))
        .and_then(|t| t.with_nanosecond(0))
        .unwrap_or_else(Utc::now);
    let mut created = 0;
    for (i, (kind, title, location, hours)) in SESSIONS.iter().enumerate() {
        let organiser = officers[i % officers.len()];
        let actor = Actor {
            tenant_id: tenant.id,
            user_id: organiser.id,
            role: organiser.role,
        };
        let day = (i as i64 * 3) / 2;
        let start = base + TimeDelta::days(day) + TimeDelta::hours(if i % 2 == 0 { 0 } else { 5 });
        // A team of five or six, different for each session.
        let invitees = users
            .iter()
            .filter(|u| u.id != organiser.id)
            .cycle()
            .skip(i % users.len())
            .take(5 + i % 2)
            .map(|u| u.id)
            .collect();
        training
            .create(
                &actor,
                NewSession {
                    title: (*title).to_owned(),
                    kind: (*kind).to_owned(),
                    description: format!(
                        "FMPA {} — tenue adaptée et EPI complets. Réponse attendue avant la veille.",
                        kind.replace('_', " ")
                    ),
                    location: (*location).to_owned(),
                    start_at: start,
                    end_at: start + TimeDelta::hours(*hours),
                    invitees,
                    reminder_offsets: None,
                },
            )
            .await?;
        created += 1;
    }
    Ok(created)
}
