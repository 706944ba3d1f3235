//! The storage conformance suite: the same assertions against every backend.
//!
//! SQLite always runs (a fresh file per test). PostgreSQL runs when
//! `MINDSP_TEST_POSTGRES_URL` is set, each test in a fresh schema; otherwise each
//! PostgreSQL case prints that it was skipped.
//!
//! Most cases go through `Messaging`, the core service, because the port's contract is
//! what the service relies on; a few talk to the port directly to prove that a tenant
//! scope cannot see another tenant even without the service's checks.

use std::collections::HashSet;
use std::sync::Arc;

use mindsp_core::model::{
    Appended, ConversationKind, MemberRole, NewConversation, NewUser, Role, SeqWindow,
};
use mindsp_core::ports::Store;
use mindsp_core::{Actor, ConversationId, Error, Limits, Messaging, TenantId, UserId};

mod support;
use support::Backend;

/// A tenant with an admin and a few users, ready to chat.
struct Dept {
    tenant: TenantId,
    admin: Actor,
    users: Vec<Actor>,
}

async fn dept(svc: &Messaging, slug: &str, n_users: usize) -> Dept {
    let store = svc.store();
    let tenant = store
        .create_tenant(slug, &format!("SDIS {slug}"))
        .await
        .unwrap();
    let mut tx = store.begin(tenant.id).await.unwrap();
    let admin = tx
        .insert_user(&new_user(
            &format!("admin@{slug}.fr"),
            "Cdt Admin",
            Role::Admin,
        ))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let admin = Actor {
        tenant_id: tenant.id,
        user_id: admin.id,
        role: Role::Admin,
    };
    let mut users = Vec::new();
    for i in 0..n_users {
        let u = svc
            .create_user(
                &admin,
                new_user(
                    &format!("user{i}@{slug}.fr"),
                    &format!("Sapeur {i}"),
                    Role::Member,
                ),
            )
            .await
            .unwrap();
        users.push(Actor {
            tenant_id: tenant.id,
            user_id: u.id,
            role: Role::Member,
        });
    }
    Dept {
        tenant: tenant.id,
        admin,
        users,
    }
}

fn new_user(email: &str, name: &str, role: Role) -> NewUser {
    NewUser {
        email: email.into(),
        display_name: name.into(),
        role,
        password_hash: "not-a-real-hash".into(),
    }
}

fn is_not_found<T: std::fmt::Debug>(r: Result<T, Error>) -> bool {
    matches!(r, Err(Error::NotFound(_)))
}

/// A message of `sender` in `conv`, without idempotency key, to append directly.
fn new_message(
    conv: ConversationId,
    sender: UserId,
    content: &str,
) -> mindsp_core::model::NewMessage {
    mindsp_core::model::NewMessage {
        id: mindsp_core::MessageId::new(),
        conversation_id: conv,
        sender_id: sender,
        content: content.into(),
        idempotency_key: None,
        created_at: mindsp_core::model::now(),
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, Error>) -> &'static str {
    r.expect_err("expected an error").code()
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let backend = super::Backend::sqlite().await;
                    super::$case(backend.store.clone()).await;
                    backend.finish().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(backend) = super::Backend::postgres().await else { return };
                    super::$case(backend.store.clone()).await;
                    backend.finish().await;
                }
            )*
        }
    };
}

conformance!(
    tenants_and_users,
    users_are_scoped_to_their_tenant,
    store_scope_never_crosses_tenants,
    direct_conversations_are_unique_per_pair,
    group_membership_rules,
    removed_member_loses_access_at_once,
    contacts_are_the_people_sharing_a_conversation,
    members_version_moves_with_membership_only,
    group_always_keeps_an_owner,
    history_pages_both_ways,
    idempotent_send,
    unread_counts_and_read_markers,
    conversation_list_by_activity,
    concurrent_senders_get_gap_free_seqs,
    concurrent_retries_with_one_key_store_one_message,
    concurrent_mixed_appends_each_get_their_own_answer,
    unit_of_work_commits_or_rolls_back_as_one,
    appending_a_stored_message_again_answers_it,
    search_folds_accents_and_plurals,
    search_sees_only_members_conversations,
    search_finds_each_message_once_its_send_returned,
    notifications_store_dedupe_page_and_count,
    notifications_stay_with_their_user_and_tenant,
    notification_prefs_and_tenant_defaults,
    notifier_over_the_store,
    notifications_for_a_whole_tenant,
    training_sessions_store_update_and_list,
    training_invitees_and_answers,
    session_locks_serialise_changes,
    unread_digest_candidates_and_contents,
);

async fn tenants_and_users(store: Arc<dyn Store>) {
    let t = store.create_tenant("sdis13", "SDIS 13").await.unwrap();
    assert_eq!(store.tenant_by_slug("sdis13").await.unwrap().unwrap(), t);
    assert!(store.tenant_by_slug("sdis99").await.unwrap().is_none());
    let dup = store.create_tenant("sdis13", "Autre").await;
    assert_eq!(code(dup), "slug_taken");

    let mut tx = store.begin(t.id).await.unwrap();
    let u = tx
        .insert_user(&new_user(
            "julien.martin@sdis13.fr",
            "Sgt Julien Martin",
            Role::Officer,
        ))
        .await
        .unwrap();
    assert_eq!(u.tenant_id, t.id);
    assert!(u.active);
    let dup = tx
        .insert_user(&new_user("julien.martin@sdis13.fr", "Autre", Role::Member))
        .await;
    assert_eq!(code(dup), "email_taken");
    drop(tx); // a failed statement may poison the transaction (PostgreSQL): start again

    let mut tx = store.begin(t.id).await.unwrap();
    let u = tx
        .insert_user(&new_user(
            "julien.martin@sdis13.fr",
            "Sgt Julien Martin",
            Role::Officer,
        ))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let mut tx = store.read(t.id).await.unwrap();
    let (found, hash) = tx
        .user_credentials("julien.martin@sdis13.fr")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found, u);
    assert_eq!(hash, "not-a-real-hash");
    assert_eq!(tx.user(u.id).await.unwrap().unwrap(), u);
    drop(tx);

    let mut tx = store.begin(t.id).await.unwrap();
    let off = tx.set_user_active(u.id, false).await.unwrap().unwrap();
    assert!(!off.active);
    assert!(tx.active_users_among(&[u.id]).await.unwrap().is_empty());
    assert!(
        tx.set_user_active(UserId::new(), false)
            .await
            .unwrap()
            .is_none()
    );
    // Each change names a later password than the one before, even within one
    // millisecond (`User::password_mark`).
    assert!(tx.set_password_hash(u.id, "first-hash").await.unwrap());
    let first = tx.user(u.id).await.unwrap().unwrap().password_mark();
    assert!(tx.set_password_hash(u.id, "another-hash").await.unwrap());
    let second = tx.user(u.id).await.unwrap().unwrap().password_mark();
    assert!(first > 0 && second > first, "{first} then {second}");
    assert!(!tx.set_password_hash(UserId::new(), "x").await.unwrap());
    let never = tx
        .insert_user(&new_user("jamais@sdis13.fr", "Jamais", Role::Member))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut tx = store.read(t.id).await.unwrap();
    let (_, hash) = tx
        .user_credentials("julien.martin@sdis13.fr")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hash, "another-hash");
    assert_eq!(found.password_changed_at, None, "never changed before");
    let changed = tx.user(u.id).await.unwrap().unwrap().password_changed_at;
    assert!(
        changed.is_some_and(|t| t >= found.created_at),
        "{changed:?}"
    );
    // Who changed their password since a time: at it counts, after it does not, a user
    // who never changed it never counts.
    let changed = changed.unwrap();
    let among = [u.id, never.id, UserId::new()];
    let day = chrono::Duration::days(1);
    let ms = chrono::Duration::milliseconds(1);
    for (since, expected) in [
        (changed, vec![u.id]),
        (found.created_at - day, vec![u.id]),
        (changed + ms, vec![]),
    ] {
        let got = tx.password_changed_among(&among, since).await.unwrap();
        assert_eq!(got, expected, "since {since}");
    }
    assert!(
        tx.password_changed_among(&[], changed)
            .await
            .unwrap()
            .is_empty()
    );
    drop(tx);

    // Last seen: kept to the millisecond, never moved back, absent until recorded;
    // another tenant can neither read nor write it.
    let at = changed + day;
    let mut tx = store.begin(t.id).await.unwrap();
    tx.record_last_seen(&[(u.id, at), (UserId::new(), at)])
        .await
        .unwrap();
    tx.record_last_seen(&[(u.id, at - day)]).await.unwrap();
    tx.record_last_seen(&[]).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = store.read(t.id).await.unwrap();
    let seen = tx.last_seen_among(&among).await.unwrap();
    assert_eq!(seen, vec![(u.id, at)]);
    assert!(tx.last_seen_among(&[]).await.unwrap().is_empty());
    drop(tx);
    let elsewhere = store.create_tenant("sdis84", "SDIS 84").await.unwrap();
    let mut tx = store.begin(elsewhere.id).await.unwrap();
    assert!(tx.last_seen_among(&[u.id]).await.unwrap().is_empty());
    tx.record_last_seen(&[(u.id, at + day)]).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = store.begin(t.id).await.unwrap();
    assert_eq!(tx.last_seen_among(&[u.id]).await.unwrap(), vec![(u.id, at)]);
    tx.record_last_seen(&[(u.id, at + ms)]).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = store.read(t.id).await.unwrap();
    assert_eq!(
        tx.last_seen_among(&[u.id]).await.unwrap(),
        vec![(u.id, at + ms)]
    );
    drop(tx);
    // A crowd in one call (a proxy reload disconnects everyone): each user gets their
    // own time, and one already later keeps theirs.
    let mut tx = store.begin(t.id).await.unwrap();
    let mut crowd = Vec::new();
    for i in 0..1_050 {
        let email = format!("pompier{i}@sdis13.fr");
        let v = tx
            .insert_user(&new_user(&email, "Pompier", Role::Member))
            .await
            .unwrap();
        crowd.push((v.id, at + chrono::Duration::seconds(i)));
    }
    crowd.push((u.id, at));
    // Listed twice in one call (a caller that does not merge): the later time holds,
    // before or after the earlier one in the list.
    let mut listed = crowd.clone();
    listed.insert(1, (crowd[3].0, crowd[3].1 + day));
    listed.push((crowd[5].0, crowd[5].1 + day));
    tx.record_last_seen(&listed).await.unwrap();
    crowd[3].1 += day;
    crowd[5].1 += day;
    tx.commit().await.unwrap();
    let ids: Vec<UserId> = crowd.iter().map(|(id, _)| *id).collect();
    let mut tx = store.read(t.id).await.unwrap();
    let mut got = tx.last_seen_among(&ids).await.unwrap();
    got.sort();
    crowd.pop();
    crowd.push((u.id, at + ms));
    crowd.sort();
    assert_eq!(got, crowd);
}

async fn users_are_scoped_to_their_tenant(store: Arc<dyn Store>) {
    let svc = Messaging::new(store.clone(), Limits::default());
    let a = dept(&svc, "sdis13", 3).await;
    let b = dept(&svc, "sdis83", 2).await;

    // The same e-mail may exist in two tenants.
    let mut tx = store.begin(b.tenant).await.unwrap();
    tx.insert_user(&new_user("user0@sdis13.fr", "Homonyme", Role::Member))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let listed = svc.list_users(&a.users[0], None, Some(100)).await.unwrap();
    assert_eq!(listed.len(), 4);
    assert!(listed.iter().all(|u| u.tenant_id == a.tenant));
    // Keyset pagination walks the directory without repeats.
    let first = svc.list_users(&a.users[0], None, Some(2)).await.unwrap();
    let last = first.last().unwrap();
    let second = svc
        .list_users(
            &a.users[0],
            Some((last.display_name.clone(), last.id)),
            Some(2),
        )
        .await
        .unwrap();
    assert_eq!(first.len() + second.len(), 4);
    assert!(second.iter().all(|u| !first.contains(u)));

    assert!(is_not_found(
        svc.user(&b.users[0], a.users[0].user_id).await
    ));
    // Admin rules: members cannot create users; admins cannot reach other tenants.
    let r = svc
        .create_user(&a.users[0], new_user("x@sdis13.fr", "X", Role::Member))
        .await;
    assert_eq!(code(r), "forbidden");
    assert!(is_not_found(
        svc.set_user_active(&b.admin, a.users[0].user_id, false)
            .await
    ));
    assert_eq!(
        code(svc.set_user_active(&a.admin, a.admin.user_id, false).await),
        "cannot_deactivate_self"
    );
    assert_eq!(
        code(
            svc.create_user(&a.admin, new_user("not-an-email", "X", Role::Member))
                .await
        ),
        "invalid_email"
    );
}

async fn store_scope_never_crosses_tenants(store: Arc<dyn Store>) {
    let svc = Messaging::new(store.clone(), Limits::default());
    let a = dept(&svc, "sdis13", 2).await;
    let b = dept(&svc, "sdis83", 2).await;
    let conv = svc
        .create_group(
            &a.users[0],
            "CIS Aix — équipe de garde",
            &[a.users[1].user_id],
        )
        .await
        .unwrap();
    svc.send(&a.users[0], conv.id, "Exercice incendie demain", None)
        .await
        .unwrap();

    // Straight at the port, in tenant B's scope, with A's identifiers.
    let mut tx = store.begin(b.tenant).await.unwrap();
    assert!(tx.conversation(conv.id).await.unwrap().is_none());
    assert!(tx.user(a.users[0].user_id).await.unwrap().is_none());
    assert!(tx.members(conv.id).await.unwrap().is_empty());
    assert!(
        tx.member(conv.id, a.users[0].user_id)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        tx.messages(conv.id, SeqWindow::Latest, 50)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        tx.active_users_among(&[a.users[0].user_id])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        tx.list_conversations(a.users[0].user_id, None, 50)
            .await
            .unwrap()
            .is_empty()
    );
    let terms = vec!["incendie".to_string()];
    assert!(
        tx.search(a.users[0].user_id, None, &terms, 0, 50)
            .await
            .unwrap()
            .is_empty()
    );
    // Writes aimed at A's rows from B's scope change nothing.
    assert!(is_not_found(
        tx.upsert_member(conv.id, b.users[0].user_id, MemberRole::Member)
            .await
    ));
    assert!(!tx.remove_member(conv.id, a.users[1].user_id).await.unwrap());
    tx.rename_conversation(conv.id, "piraté").await.unwrap();
    assert!(is_not_found(
        tx.mark_read(conv.id, a.users[0].user_id, 1).await
    ));
    tx.commit().await.unwrap();

    let mut tx = store.begin(b.tenant).await.unwrap();
    let forged = new_message(conv.id, a.users[0].user_id, "intrusion");
    assert!(is_not_found(tx.append_message(&forged).await));
    drop(tx);

    let (c, members) = svc.conversation(&a.users[0], conv.id).await.unwrap();
    assert_eq!(c.name.as_deref(), Some("CIS Aix — équipe de garde"));
    assert_eq!(c.last_seq, 1);
    assert_eq!(members.len(), 2);

    // And through the service, B's users get exactly what a missing id gets.
    let bu = &b.users[0];
    assert!(is_not_found(svc.conversation(bu, conv.id).await));
    assert!(is_not_found(svc.send(bu, conv.id, "salut", None).await));
    assert!(is_not_found(
        svc.history(bu, conv.id, SeqWindow::Latest, None).await
    ));
    assert!(is_not_found(svc.mark_read(bu, conv.id, None).await));
    assert!(is_not_found(
        svc.add_members(&b.admin, conv.id, &[bu.user_id]).await
    ));
    assert!(is_not_found(
        svc.search(bu, "incendie", Some(conv.id), 0, None).await
    ));
    assert!(is_not_found(svc.open_direct(bu, a.users[0].user_id).await));
    assert!(is_not_found(
        svc.create_group(bu, "mixte", &[a.users[0].user_id]).await
    ));
}

async fn direct_conversations_are_unique_per_pair(store: Arc<dyn Store>) {
    let svc = Messaging::new(store.clone(), Limits::default());
    let a = dept(&svc, "sdis13", 3).await;
    let (u0, u1) = (&a.users[0], &a.users[1]);
    let (c1, created) = svc.open_direct(u0, u1.user_id).await.unwrap();
    assert!(created);
    assert_eq!(c1.kind, ConversationKind::Direct);
    let (c2, created) = svc.open_direct(u1, u0.user_id).await.unwrap();
    assert!(!created);
    assert_eq!(c1.id, c2.id);
    assert_eq!(
        code(svc.open_direct(u0, u0.user_id).await),
        "invalid_members"
    );
    assert!(is_not_found(svc.open_direct(u0, UserId::new()).await));

    // At the port: a second direct row for the same pair is refused.
    let mut tx = store.begin(a.tenant).await.unwrap();
    let again = tx
        .insert_conversation(&NewConversation {
            kind: ConversationKind::Direct,
            name: None,
            created_by: u1.user_id,
            members: vec![
                (u1.user_id, MemberRole::Member),
                (u0.user_id, MemberRole::Member),
            ],
        })
        .await;
    assert_eq!(code(again), "direct_exists");
    drop(tx);

    // Direct conversations have fixed members.
    assert_eq!(
        code(svc.add_members(u0, c1.id, &[a.users[2].user_id]).await),
        "direct_conversation"
    );
    // Concurrent opens of the same pair end in one conversation.
    let mut handles = Vec::new();
    for _ in 0..8 {
        let (svc, me, other) = (svc.clone(), *u0, a.users[2].user_id);
        handles.push(tokio::spawn(
            async move { svc.open_direct(&me, other).await },
        ));
    }
    let mut ids = HashSet::new();
    for h in handles {
        ids.insert(h.await.unwrap().unwrap().0.id);
    }
    assert_eq!(ids.len(), 1);
}

async fn group_membership_rules(store: Arc<dyn Store>) {
    let svc = Messaging::new(store.clone(), Limits::default());
    let a = dept(&svc, "sdis13", 4).await;
    let [owner, m1, m2, outsider] = [a.users[0], a.users[1], a.users[2], a.users[3]];
    let g = svc
        .create_group(&owner, "  FPT Marseille-Nord  ", &[m1.user_id, m1.user_id])
        .await
        .unwrap();
    assert_eq!(g.name.as_deref(), Some("FPT Marseille-Nord"));
    let (_, members) = svc.conversation(&m1, g.id).await.unwrap();
    assert_eq!(members.len(), 2);
    assert_eq!(members[0].user_id, owner.user_id);
    assert_eq!(members[0].role, MemberRole::Owner);

    // Non-members see nothing and cannot post.
    assert!(is_not_found(svc.conversation(&outsider, g.id).await));
    assert!(is_not_found(
        svc.send(&outsider, g.id, "bonjour", None).await
    ));
    assert!(is_not_found(
        svc.history(&outsider, g.id, SeqWindow::Latest, None).await
    ));
    // Plain members cannot add, rename or change roles.
    assert_eq!(
        code(svc.add_members(&m1, g.id, &[m2.user_id]).await),
        "forbidden"
    );
    assert_eq!(code(svc.rename(&m1, g.id, "X").await), "forbidden");
    assert_eq!(
        code(
            svc.set_member_role(&m1, g.id, m1.user_id, MemberRole::Owner)
                .await
        ),
        "forbidden"
    );
    // Owners can; adding an unknown user writes nothing.
    assert!(is_not_found(
        svc.add_members(&owner, g.id, &[m2.user_id, UserId::new()])
            .await
    ));
    assert_eq!(svc.conversation(&owner, g.id).await.unwrap().1.len(), 2);
    let members = svc.add_members(&owner, g.id, &[m2.user_id]).await.unwrap();
    assert_eq!(members.len(), 3);
    svc.set_member_role(&owner, g.id, m1.user_id, MemberRole::Admin)
        .await
        .unwrap();
    // An admin may remove a member but not the owner.
    assert_eq!(
        code(svc.remove_member(&m1, g.id, owner.user_id).await),
        "forbidden"
    );
    svc.rename(&m1, g.id, "FPT Marseille-Nord — garde")
        .await
        .unwrap();
    assert_eq!(
        svc.conversation(&m2, g.id).await.unwrap().0.name.as_deref(),
        Some("FPT Marseille-Nord — garde")
    );
    assert_eq!(code(svc.rename(&m1, g.id, "   ").await), "invalid_name");
    // A group of more than the limit is refused.
    let small = Messaging::new(
        store.clone(),
        Limits {
            max_group_members: 2,
            ..Limits::default()
        },
    );
    assert_eq!(
        code(
            small
                .create_group(&owner, "trop", &[m1.user_id, m2.user_id])
                .await
        ),
        "group_too_large"
    );
    // Deactivated users cannot be added.
    svc.set_user_active(&a.admin, outsider.user_id, false)
        .await
        .unwrap();
    assert!(is_not_found(
        svc.add_members(&owner, g.id, &[outsider.user_id]).await
    ));
}

async fn removed_member_loses_access_at_once(store: Arc<dyn Store>) {
    let svc = Messaging::new(store.clone(), Limits::default());
    let a = dept(&svc, "sdis13", 2).await;
    let [owner, m1] = [a.users[0], a.users[1]];
    let g = svc
        .create_group(&owner, "VSAV 1", &[m1.user_id])
        .await
        .unwrap();
    svc.send(&m1, g.id, "présent", None).await.unwrap();
    svc.remove_member(&owner, g.id, m1.user_id).await.unwrap();
    assert!(is_not_found(svc.send(&m1, g.id, "encore là ?", None).await));
    assert!(is_not_found(
        svc.history(&m1, g.id, SeqWindow::Latest, None).await
    ));
    // Searching across all of m1's conversations no longer reaches the group.
    assert!(
        svc.search(&m1, "présent", None, 0, None)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        svc.list_conversations(&m1, None, None)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        code(svc.remove_member(&owner, g.id, m1.user_id).await),
        "not_found"
    );
}

/// Contacts (who sees a user's presence) are the people sharing a conversation with
/// them: each once, never themselves, never across tenants; leaving a group ends it.
async fn contacts_are_the_people_sharing_a_conversation(store: Arc<dyn Store>) {
    let svc = Messaging::new(store.clone(), Limits::default());
    let a = dept(&svc, "sdis13", 5).await;
    let b = dept(&svc, "sdis83", 1).await;
    let [u0, u1, u2, u3, u4] = [a.users[0], a.users[1], a.users[2], a.users[3], a.users[4]];
    svc.open_direct(&u0, u1.user_id).await.unwrap();
    let g = svc
        .create_group(&u0, "VSAV 1", &[u1.user_id, u2.user_id])
        .await
        .unwrap();
    svc.create_group(&u3, "FPT", &[u4.user_id]).await.unwrap();
    let contacts = |tenant: TenantId, who: Actor| {
        let store = store.clone();
        async move {
            let mut tx = store.read(tenant).await.unwrap();
            let mut ids = tx.contacts(who.user_id).await.unwrap();
            ids.sort_by_key(|u| u.0);
            ids
        }
    };
    let sorted = |mut ids: Vec<UserId>| {
        ids.sort_by_key(|u| u.0);
        ids
    };
    assert_eq!(
        contacts(a.tenant, u0).await,
        sorted(vec![u1.user_id, u2.user_id])
    );
    assert_eq!(
        contacts(a.tenant, u2).await,
        sorted(vec![u0.user_id, u1.user_id])
    );
    assert_eq!(contacts(a.tenant, u3).await, vec![u4.user_id]);
    assert_eq!(contacts(a.tenant, a.admin).await, vec![]);
    assert_eq!(contacts(b.tenant, b.users[0]).await, vec![]);
    // Asked within another tenant, a user has no contacts there.
    assert_eq!(contacts(b.tenant, u0).await, vec![]);
    svc.remove_member(&u0, g.id, u2.user_id).await.unwrap();
    assert_eq!(contacts(a.tenant, u2).await, vec![]);
    assert_eq!(contacts(a.tenant, u0).await, vec![u1.user_id]);
}

/// Appends report the conversation's membership version (a publisher caches members
/// under it): it moves when a member is added or removed, in the same commit, and not
/// with messages or role changes; the batched append and the one in a unit of work agree.
async fn members_version_moves_with_membership_only(store: Arc<dyn Store>) {
    let svc = Messaging::new(store.clone(), Limits::default());
    let a = dept(&svc, "sdis13", 3).await;
    let [owner, m1, m2] = [a.users[0], a.users[1], a.users[2]];
    let g = svc
        .create_group(&owner, "CTA", &[m1.user_id])
        .await
        .unwrap();
    let version = |appended: Appended| {
        assert!(appended.created());
        appended
            .members_version()
            .expect("both stores keep a version")
    };
    let in_unit = |sender: Actor| {
        let store = store.clone();
        async move {
            let mut tx = store.begin(sender.tenant_id).await.unwrap();
            let appended = tx
                .append_message(&new_message(g.id, sender.user_id, "dans une unité"))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            appended
        }
    };
    let v0 = version(svc.send(&owner, g.id, "un", None).await.unwrap());
    assert_eq!(
        version(svc.send(&m1, g.id, "deux", None).await.unwrap()),
        v0
    );
    assert_eq!(version(in_unit(m1).await), v0);
    svc.set_member_role(&owner, g.id, m1.user_id, MemberRole::Admin)
        .await
        .unwrap();
    assert_eq!(
        version(svc.send(&owner, g.id, "trois", None).await.unwrap()),
        v0
    );

    svc.add_members(&owner, g.id, &[m2.user_id]).await.unwrap();
    let v1 = version(svc.send(&owner, g.id, "quatre", None).await.unwrap());
    assert!(v1 > v0, "{v1} after {v0}");
    assert_eq!(version(in_unit(m2).await), v1);

    svc.remove_member(&owner, g.id, m2.user_id).await.unwrap();
    let v2 = version(svc.send(&m1, g.id, "cinq", None).await.unwrap());
    assert!(v2 > v1, "{v2} after {v1}");
    assert_eq!(version(in_unit(owner).await), v2);
    // A repeated idempotency key stores nothing and reports no version.
    let first = svc
        .send(&m1, g.id, "six", Some("k-6".into()))
        .await
        .unwrap();
    assert_eq!(version(first), v2);
    let again = svc
        .send(&m1, g.id, "six", Some("k-6".into()))
        .await
        .unwrap();
    assert!(!again.created());
    assert_eq!(again.members_version(), None);
}

async fn group_always_keeps_an_owner(store: Arc<dyn Store>) {
    let svc = Messaging::new(store.clone(), Limits::default());
    let a = dept(&svc, "sdis13", 3).await;
    let [owner, m1, m2] = [a.users[0], a.users[1], a.users[2]];
    let g = svc
        .create_group(&owner, "Groupement Sud", &[m1.user_id, m2.user_id])
        .await
        .unwrap();
    assert_eq!(
        code(
            svc.set_member_role(&owner, g.id, owner.user_id, MemberRole::Member)
                .await
        ),
        "last_owner"
    );
    svc.set_member_role(&owner, g.id, m2.user_id, MemberRole::Admin)
        .await
        .unwrap();
    // The owner leaves: the admin (m2) inherits, even though m1 joined at the same time.
    svc.remove_member(&owner, g.id, owner.user_id)
        .await
        .unwrap();
    let (_, members) = svc.conversation(&m1, g.id).await.unwrap();
    let roles: Vec<_> = members.iter().map(|m| (m.user_id, m.role)).collect();
    assert!(roles.contains(&(m2.user_id, MemberRole::Owner)));
    assert!(roles.contains(&(m1.user_id, MemberRole::Member)));
    // The new owner leaves: the last member inherits.
    svc.remove_member(&m2, g.id, m2.user_id).await.unwrap();
    let (_, members) = svc.conversation(&m1, g.id).await.unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].role, MemberRole::Owner);
}

async fn history_pages_both_ways(store: Arc<dyn Store>) {
    let svc = Messaging::new(store.clone(), Limits::default());
    let a = dept(&svc, "sdis13", 2).await;
    let (c, _) = svc
        .open_direct(&a.users[0], a.users[1].user_id)
        .await
        .unwrap();
    for i in 1..=25 {
        let sender = &a.users[i % 2];
        let m = svc
            .send(sender, c.id, &format!("message {i}"), None)
            .await
            .unwrap();
        assert_eq!(m.message().seq, i as i64);
    }
    let u = &a.users[0];
    for (window, expected) in [
        (SeqWindow::Latest, 16..=25),
        (SeqWindow::Before(16), 6..=15),
        (SeqWindow::Before(6), 1..=5),
        (SeqWindow::After(0), 1..=10),
        (SeqWindow::After(20), 21..=25),
    ] {
        let page = svc.history(u, c.id, window, Some(10)).await.unwrap();
        let seqs: Vec<i64> = page.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, expected.collect::<Vec<_>>(), "{window:?}");
    }
    assert!(
        svc.history(u, c.id, SeqWindow::After(25), None)
            .await
            .unwrap()
            .is_empty()
    );
    let one = svc
        .history(u, c.id, SeqWindow::After(4), Some(1))
        .await
        .unwrap();
    assert_eq!(one[0].content, "message 5");
    assert_eq!(
        code(svc.history(u, c.id, SeqWindow::Latest, Some(0)).await),
        "invalid_limit"
    );
    assert_eq!(
        code(svc.history(u, c.id, SeqWindow::Latest, Some(101)).await),
        "invalid_limit"
    );
    assert_eq!(
        code(svc.history(u, c.id, SeqWindow::Before(-1), None).await),
        "invalid_cursor"
    );
    assert!(is_not_found(
        svc.history(u, ConversationId::new(), SeqWindow::Latest, None)
            .await
    ));
    // Content rules.
    assert_eq!(code(svc.send(u, c.id, "   ", None).await), "empty_content");
    let long = "é".repeat(4001);
    assert_eq!(
        code(svc.send(u, c.id, &long, None).await),
        "content_too_long"
    );
    assert!(svc.send(u, c.id, &"é".repeat(4000), None).await.is_ok());
}

async fn idempotent_send(store: Arc<dyn Store>) {
    let svc = Messaging::new(store.clone(), Limits::default());
    let a = dept(&svc, "sdis13", 2).await;
    let (u0, u1) = (&a.users[0], &a.users[1]);
    let (c, _) = svc.open_direct(u0, u1.user_id).await.unwrap();
    let first = svc
        .send(u0, c.id, "Départ VSAV", Some("k-1".into()))
        .await
        .unwrap();
    assert!(first.created());
    let again = svc
        .send(u0, c.id, "Départ VSAV", Some("k-1".into()))
        .await
        .unwrap();
    assert!(matches!(again, Appended::Existing(_)));
    assert_eq!(again.message(), first.message());
    // The same key from another sender is their own message.
    let other = svc
        .send(u1, c.id, "Reçu", Some("k-1".into()))
        .await
        .unwrap();
    assert!(other.created());
    assert_eq!(other.message().seq, 2);
    let all = svc
        .history(u0, c.id, SeqWindow::Latest, None)
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(
        code(svc.send(u0, c.id, "x", Some(String::new())).await),
        "invalid_idempotency_key"
    );
    assert_eq!(
        code(svc.send(u0, c.id, "x", Some("k".repeat(129))).await),
        "invalid_idempotency_key"
    );
}

async fn unread_counts_and_read_markers(store: Arc<dyn Store>) {
    let svc = Messaging::new(store.clone(), Limits::default());
    let a = dept(&svc, "sdis13", 3).await;
    let [u0, u1, u2] = [a.users[0], a.users[1], a.users[2]];
    let g = svc
        .create_group(&u0, "CS Istres", &[u1.user_id])
        .await
        .unwrap();
    for i in 0..5 {
        svc.send(&u0, g.id, &format!("info {i}"), None)
            .await
            .unwrap();
    }
    let unread = |v: Vec<mindsp_core::model::ConversationSummary>| v[0].unread_count;
    assert_eq!(
        unread(svc.list_conversations(&u0, None, None).await.unwrap()),
        0
    );
    assert_eq!(
        unread(svc.list_conversations(&u1, None, None).await.unwrap()),
        5
    );
    assert_eq!(svc.mark_read(&u1, g.id, Some(3)).await.unwrap(), 3);
    assert_eq!(
        unread(svc.list_conversations(&u1, None, None).await.unwrap()),
        2
    );
    // Never backwards, never beyond the end.
    assert_eq!(svc.mark_read(&u1, g.id, Some(1)).await.unwrap(), 3);
    assert_eq!(svc.mark_read(&u1, g.id, Some(999)).await.unwrap(), 5);
    assert_eq!(
        unread(svc.list_conversations(&u1, None, None).await.unwrap()),
        0
    );
    assert_eq!(
        code(svc.mark_read(&u1, g.id, Some(-2)).await),
        "invalid_seq"
    );
    // A reply from u1 is unread for u0 only.
    svc.send(&u1, g.id, "bien reçu", None).await.unwrap();
    assert_eq!(
        unread(svc.list_conversations(&u0, None, None).await.unwrap()),
        1
    );
    assert_eq!(
        unread(svc.list_conversations(&u1, None, None).await.unwrap()),
        0
    );
    // Someone added later starts with nothing unread, and sees new messages as unread.
    svc.add_members(&u0, g.id, &[u2.user_id]).await.unwrap();
    assert_eq!(
        unread(svc.list_conversations(&u2, None, None).await.unwrap()),
        0
    );
    svc.send(&u0, g.id, "bienvenue", None).await.unwrap();
    assert_eq!(
        unread(svc.list_conversations(&u2, None, None).await.unwrap()),
        1
    );
    assert_eq!(svc.mark_read(&u2, g.id, None).await.unwrap(), 7);
    let (_, members) = svc.conversation(&u0, g.id).await.unwrap();
    let marker = |u: UserId| {
        members
            .iter()
            .find(|m| m.user_id == u)
            .unwrap()
            .last_read_seq
    };
    assert_eq!(
        (marker(u0.user_id), marker(u1.user_id), marker(u2.user_id)),
        (7, 6, 7)
    );
}

async fn conversation_list_by_activity(store: Arc<dyn Store>) {
    let svc = Messaging::new(store.clone(), Limits::default());
    let a = dept(&svc, "sdis13", 4).await;
    let me = a.users[0];
    let mut convs = Vec::new();
    for other in &a.users[1..] {
        convs.push(svc.open_direct(&me, other.user_id).await.unwrap().0);
    }
    let g = svc.create_group(&me, "Groupe", &[]).await.unwrap();
    // Activity order: messages in convs[1], then convs[0]; the group and convs[2] are idle.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    svc.send(&me, convs[1].id, "un", None).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let last = svc
        .send(&a.users[1], convs[0].id, "deux", None)
        .await
        .unwrap();
    let list = svc.list_conversations(&me, None, Some(2)).await.unwrap();
    assert_eq!(list[0].conversation.id, convs[0].id);
    assert_eq!(list[0].last_message.as_ref(), Some(last.message()));
    assert_eq!(list[0].unread_count, 1);
    assert_eq!(list[0].member_count, 2);
    assert_eq!(list[1].conversation.id, convs[1].id);
    let cursor = mindsp_core::model::ActivityCursor {
        last_activity_at: list[1].conversation.last_activity_at,
        id: list[1].conversation.id,
    };
    let rest = svc
        .list_conversations(&me, Some(cursor), Some(10))
        .await
        .unwrap();
    let ids: HashSet<_> = rest.iter().map(|s| s.conversation.id).collect();
    assert_eq!(ids, HashSet::from([convs[2].id, g.id]));
    assert!(rest.iter().all(|s| s.last_message.is_none()));
}

async fn concurrent_senders_get_gap_free_seqs(store: Arc<dyn Store>) {
    let svc = Messaging::new(store.clone(), Limits::default());
    let a = dept(&svc, "sdis13", 5).await;
    let others: Vec<UserId> = a.users[1..].iter().map(|u| u.user_id).collect();
    let g = svc
        .create_group(&a.users[0], "Feux de forêt", &others)
        .await
        .unwrap();
    const TASKS: usize = 50;
    const PER_TASK: usize = 100;
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let svc = svc.clone();
        let me = a.users[t % a.users.len()];
        handles.push(tokio::spawn(async move {
            let mut seqs = Vec::with_capacity(PER_TASK);
            for i in 0..PER_TASK {
                let m = svc
                    .send(&me, g.id, &format!("t{t} m{i}"), Some(format!("{t}-{i}")))
                    .await
                    .unwrap();
                seqs.push(m.message().seq);
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        let seqs = h.await.unwrap();
        // Each sender's own messages are in the order they were sent.
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        all.extend(seqs);
    }
    all.sort_unstable();
    let expected: Vec<i64> = (1..=(TASKS * PER_TASK) as i64).collect();
    assert_eq!(all, expected, "sequence numbers are unique and gap-free");
    let (c, _) = svc.conversation(&a.users[0], g.id).await.unwrap();
    assert_eq!(c.last_seq, (TASKS * PER_TASK) as i64);
}

async fn concurrent_retries_with_one_key_store_one_message(store: Arc<dyn Store>) {
    let svc = Messaging::new(store.clone(), Limits::default());
    let a = dept(&svc, "sdis13", 2).await;
    let (c, _) = svc
        .open_direct(&a.users[0], a.users[1].user_id)
        .await
        .unwrap();
    let mut handles = Vec::new();
    for _ in 0..16 {
        let (svc, me) = (svc.clone(), a.users[0]);
        handles.push(tokio::spawn(async move {
            svc.send(&me, c.id, "Alerte", Some("retry-key".into()))
                .await
        }));
    }
    let mut ids = HashSet::new();
    let mut created = 0;
    for h in handles {
        let r = h.await.unwrap().unwrap();
        created += usize::from(r.created());
        ids.insert(r.message().id);
    }
    assert_eq!((ids.len(), created), (1, 1));
    let (c, _) = svc.conversation(&a.users[0], c.id).await.unwrap();
    assert_eq!(c.last_seq, 1);
}

/// Appends arriving together (and so, on backends with group commit, committed
/// together) are still judged one by one: a refused one does not fail the others.
async fn concurrent_mixed_appends_each_get_their_own_answer(store: Arc<dyn Store>) {
    let svc = Messaging::new(store.clone(), Limits::default());
    let a = dept(&svc, "sdis13", 3).await;
    let b = dept(&svc, "sdis83", 1).await;
    let [u0, u1, outsider] = [a.users[0], a.users[1], a.users[2]];
    let g = svc.create_group(&u0, "Garde", &[u1.user_id]).await.unwrap();
    let other = svc.create_group(&u1, "Autre", &[]).await.unwrap();
    #[derive(Debug, PartialEq)]
    enum Want {
        Created,
        Same,
        NotFound,
    }
    for round in 0..20 {
        let mut handles = Vec::new();
        let mut spawn = |who: Actor, conv: ConversationId, key: Option<String>, want: Want| {
            let svc = svc.clone();
            handles.push((
                want,
                tokio::spawn(async move { svc.send(&who, conv, "message", key).await }),
            ));
        };
        spawn(u0, g.id, None, Want::Created);
        spawn(outsider, g.id, None, Want::NotFound);
        spawn(b.users[0], g.id, None, Want::NotFound);
        spawn(u1, g.id, Some(format!("k{round}")), Want::Created);
        spawn(u1, g.id, Some(format!("k{round}")), Want::Same);
        spawn(u0, ConversationId::new(), None, Want::NotFound);
        spawn(u1, other.id, None, Want::Created);
        spawn(u0, other.id, None, Want::NotFound);
        let mut answers = Vec::new();
        for (want, h) in handles {
            answers.push((want, h.await.unwrap()));
        }
        let created = answers
            .iter()
            .filter(|(_, r)| matches!(r, Ok(a) if a.created()))
            .count();
        assert_eq!(created, 3, "round {round}: {answers:?}");
        for (want, r) in &answers {
            match want {
                Want::Created | Want::Same => assert!(r.is_ok(), "round {round}: {answers:?}"),
                Want::NotFound => assert!(
                    matches!(r, Err(Error::NotFound(_))),
                    "round {round}: {answers:?}"
                ),
            }
        }
        // The two sends with one key got the same message.
        let keyed: Vec<_> = answers[3..5]
            .iter()
            .map(|(_, r)| r.as_ref().unwrap().message().id)
            .collect();
        assert_eq!(keyed[0], keyed[1]);
    }
    let (c, _) = svc.conversation(&u0, g.id).await.unwrap();
    assert_eq!(c.last_seq, 40);
    let all = svc
        .history(&u0, g.id, SeqWindow::After(0), Some(100))
        .await
        .unwrap();
    assert_eq!(
        all.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=40).collect::<Vec<_>>()
    );
    let (c, _) = svc.conversation(&u1, other.id).await.unwrap();
    assert_eq!(c.last_seq, 20);
}

/// A message and another adapter's write (here raw SQL through the backend's own
/// transaction, as the job queue and notifications will do) land together or not at all.
async fn unit_of_work_commits_or_rolls_back_as_one(store: Arc<dyn Store>) {
    let svc = Messaging::new(store.clone(), Limits::default());
    let a = dept(&svc, "sdis13", 1).await;
    let me = a.users[0];
    let g = svc.create_group(&me, "Avant", &[]).await.unwrap();
    for commit in [false, true] {
        let mut tx = store.begin(a.tenant).await.unwrap();
        let appended = tx
            .append_message(&new_message(g.id, me.user_id, "avec son effet de bord"))
            .await
            .unwrap();
        assert!(appended.created());
        // The other write, through the backend's transaction reached by downcasting.
        let any = tx.as_any_mut();
        if let Some(t) = any.downcast_mut::<mindsp_store::sqlite::SqliteTx>() {
            sqlx::query("UPDATE conversations SET name = 'Après' WHERE id = ?")
                .bind(g.id.0)
                .execute(&mut **t.transaction())
                .await
                .unwrap();
        } else if let Some(t) = any.downcast_mut::<mindsp_store::postgres::PgTx>() {
            sqlx::query("UPDATE conversations SET name = 'Après' WHERE id = $1")
                .bind(g.id.0)
                .execute(&mut **t.transaction())
                .await
                .unwrap();
        } else {
            panic!("unknown backend transaction type");
        }
        if commit {
            tx.commit().await.unwrap();
        } else {
            drop(tx);
        }
        let (c, _) = svc.conversation(&me, g.id).await.unwrap();
        let expected = if commit { (1, "Après") } else { (0, "Avant") };
        assert_eq!((c.last_seq, c.name.as_deref().unwrap()), expected);
    }
}

/// The very same message appended twice (same id, no idempotency key: a retry after a
/// commit whose answer was lost) is answered with the stored message, not an error.
async fn appending_a_stored_message_again_answers_it(store: Arc<dyn Store>) {
    let svc = Messaging::new(store.clone(), Limits::default());
    let a = dept(&svc, "sdis13", 1).await;
    let g = svc.create_group(&a.users[0], "Garde", &[]).await.unwrap();
    let msg = new_message(g.id, a.users[0].user_id, "une seule fois");
    let first = store.append(a.tenant, &msg).await.unwrap();
    assert!(first.created());
    let again = store.append(a.tenant, &msg).await.unwrap();
    assert_eq!(again, Appended::Existing(first.message().clone()));
    let (c, _) = svc.conversation(&a.users[0], g.id).await.unwrap();
    assert_eq!(c.last_seq, 1);
}

async fn search_folds_accents_and_plurals(store: Arc<dyn Store>) {
    let svc = Messaging::new(store.clone(), Limits::default());
    let a = dept(&svc, "sdis13", 2).await;
    let [u0, u1] = [a.users[0], a.users[1]];
    let g = svc
        .create_group(&u0, "Formation", &[u1.user_id])
        .await
        .unwrap();
    let texts = [
        "Rappel des consignes de sécurité pour l'exercice ARI",
        "Les pompiers de Marseille-Nord arrivent",
        "Intervention terminée, retour au centre",
        "Réunion à 18 h au CIS Aix",
        "sécurité, sécurité, sécurité : le mot du jour",
    ];
    for t in texts {
        svc.send(&u0, g.id, t, None).await.unwrap();
    }
    let contents = |hits: Vec<mindsp_core::model::SearchHit>| {
        hits.into_iter()
            .map(|h| h.message.content)
            .collect::<Vec<_>>()
    };
    let hits = contents(svc.search(&u1, "securite", None, 0, None).await.unwrap());
    assert_eq!(hits.len(), 2, "{hits:?}");
    // Ranked: the message saying it three times comes first.
    assert_eq!(hits[0], texts[4]);
    let hits = contents(
        svc.search(&u1, "pompier", Some(g.id), 0, None)
            .await
            .unwrap(),
    );
    assert_eq!(hits, vec![texts[1].to_string()]);
    let hits = contents(
        svc.search(&u1, "interventions", None, 0, None)
            .await
            .unwrap(),
    );
    assert_eq!(hits, vec![texts[2].to_string()]);
    let hits = contents(svc.search(&u1, "REUNION aix", None, 0, None).await.unwrap());
    assert_eq!(hits, vec![texts[3].to_string()]);
    assert!(
        svc.search(&u1, "inondation", None, 0, None)
            .await
            .unwrap()
            .is_empty()
    );
    // Paging.
    let p1 = svc.search(&u1, "securite", None, 0, Some(1)).await.unwrap();
    let p2 = svc.search(&u1, "securite", None, 1, Some(1)).await.unwrap();
    assert_eq!(p1.len() + p2.len(), 2);
    assert_ne!(p1[0].message.id, p2[0].message.id);
    // Query syntax is never passed through.
    assert!(
        svc.search(&u1, "\"sécurité\" OR *", None, 0, None)
            .await
            .is_ok()
    );
    assert_eq!(
        code(svc.search(&u1, "  !!! ", None, 0, None).await),
        "invalid_query"
    );
    assert_eq!(
        code(svc.search(&u1, &"a".repeat(201), None, 0, None).await),
        "invalid_query"
    );
    assert_eq!(
        code(svc.search(&u1, "feu", None, 5000, None).await),
        "invalid_cursor"
    );
}

/// A word of its own for message `n`: consonants only, so that no stemmer shortens two
/// words to the same stem.
fn unique_word(n: usize) -> String {
    const LETTERS: &[u8; 10] = b"bcdfghjklm";
    let digits = format!("{n:04}");
    format!(
        "zrt{}",
        digits
            .bytes()
            .map(|d| LETTERS[usize::from(d - b'0')] as char)
            .collect::<String>()
    )
}

/// Full-text indexing is done beside the appends, not in their transactions: a message
/// must still be found by a search made as soon as its send has returned, while other
/// senders keep appending around it, and by every member.
async fn search_finds_each_message_once_its_send_returned(store: Arc<dyn Store>) {
    let svc = Messaging::new(store.clone(), Limits::default());
    let a = dept(&svc, "sdis13", 4).await;
    let others: Vec<UserId> = a.users[1..].iter().map(|u| u.user_id).collect();
    let g = svc
        .create_group(&a.users[0], "Relevés", &others)
        .await
        .unwrap();
    const TASKS: usize = 16;
    const PER_TASK: usize = 12;
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let svc = svc.clone();
        let me = a.users[t % a.users.len()];
        let reader = a.users[(t + 1) % a.users.len()];
        handles.push(tokio::spawn(async move {
            let mut sent = Vec::with_capacity(PER_TASK);
            for i in 0..PER_TASK {
                let word = unique_word(t * PER_TASK + i);
                let m = svc
                    .send(&me, g.id, &format!("Relevé de la borne {word}"), None)
                    .await
                    .unwrap();
                let id = m.message().id;
                let hits = svc.search(&reader, &word, None, 0, None).await.unwrap();
                assert!(
                    hits.iter().any(|h| h.message.id == id),
                    "{word} not found right after its send returned: {hits:?}"
                );
                sent.push((word, id));
            }
            sent
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    // Once the burst is over, every message is still found, once, in its conversation.
    for (word, id) in all {
        let hits = svc
            .search(&a.users[0], &word, Some(g.id), 0, None)
            .await
            .unwrap();
        assert_eq!(
            hits.iter().filter(|h| h.message.id == id).count(),
            1,
            "{word}: {hits:?}"
        );
    }
}

async fn search_sees_only_members_conversations(store: Arc<dyn Store>) {
    let svc = Messaging::new(store.clone(), Limits::default());
    let a = dept(&svc, "sdis13", 3).await;
    let b = dept(&svc, "sdis83", 1).await;
    let [u0, u1, u2] = [a.users[0], a.users[1], a.users[2]];
    let g = svc.create_group(&u0, "Privé", &[u1.user_id]).await.unwrap();
    svc.send(&u0, g.id, "Désincarcération sur l'A7", None)
        .await
        .unwrap();
    let g2 = svc.create_group(&u2, "Autre", &[]).await.unwrap();
    svc.send(&u2, g2.id, "Désincarcération exercice", None)
        .await
        .unwrap();
    assert_eq!(
        svc.search(&u1, "desincarceration", None, 0, None)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        svc.search(&u2, "desincarceration", None, 0, None)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        svc.search(&u0, "desincarceration", None, 0, None)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(is_not_found(
        svc.search(&u2, "desincarceration", Some(g.id), 0, None)
            .await
    ));
    assert!(
        svc.search(&b.users[0], "desincarceration", None, 0, None)
            .await
            .unwrap()
            .is_empty()
    );
}

// ---- notifications, digest, training sessions ---------------------------------------

mod fmpa {
    use std::collections::HashSet;
    use std::sync::Arc;

    use chrono::{DateTime, TimeDelta, Utc};
    use mindsp_core::model::{Role, now};
    use mindsp_core::notify::{
        ChannelPrefs, NewNotification, Notification, NotificationPrefs, Notifier, NotifyConfig,
        QuietHours, kind,
    };
    use mindsp_core::ports::Store;
    use mindsp_core::training::{Attendance, SessionFilter, SessionStatus, TrainingSession};
    use mindsp_core::{Error, Limits, Messaging, NotificationId, SessionId, UserId};

    use super::{dept, new_user};

    fn notif(user: UserId, title: &str, key: Option<&str>) -> Notification {
        Notification {
            id: NotificationId::new(),
            user_id: user,
            kind: kind::SYSTEM.into(),
            title: title.into(),
            body: format!("corps de {title}"),
            link: Some("/fmpa/1".into()),
            data: serde_json::json!({"n": title}),
            key: key.map(str::to_owned),
            created_at: now(),
            read_at: None,
        }
    }

    async fn unread(store: &Arc<dyn Store>, t: mindsp_core::TenantId, u: UserId) -> i64 {
        let mut tx = store.read(t).await.unwrap();
        tx.notification_unread_counts(&[u])
            .await
            .unwrap()
            .into_iter()
            .find(|(x, _)| *x == u)
            .map_or(0, |(_, n)| n)
    }

    pub(super) async fn notifications_store_dedupe_page_and_count(store: Arc<dyn Store>) {
        let svc = Messaging::new(store.clone(), Limits::default());
        let a = dept(&svc, "sdis13", 2).await;
        let (u0, u1) = (a.users[0].user_id, a.users[1].user_id);

        let mut tx = store.begin(a.tenant).await.unwrap();
        let mut rows: Vec<Notification> = (0..25)
            .map(|i| notif(u0, &format!("n{i:02}"), None))
            .collect();
        rows.push(notif(u0, "keyed", Some("fmpa:1")));
        rows.push(notif(u1, "keyed", Some("fmpa:1")));
        let ids = tx.insert_notifications(&rows).await.unwrap();
        assert_eq!(ids.len(), 27);
        // The same key again, for u0 (skipped) and a fresh key (stored); an empty call.
        let again = notif(u0, "keyed again", Some("fmpa:1"));
        let fresh = notif(u0, "other", Some("fmpa:2"));
        let ids2 = tx
            .insert_notifications(&[again.clone(), fresh.clone()])
            .await
            .unwrap();
        assert_eq!(ids2, vec![fresh.id]);
        assert!(tx.insert_notifications(&[]).await.unwrap().is_empty());
        // Duplicates inside one call: the first is stored.
        let d1 = notif(u1, "dup1", Some("k"));
        let d2 = notif(u1, "dup2", Some("k"));
        let ids3 = tx.insert_notifications(&[d1.clone(), d2]).await.unwrap();
        assert_eq!(ids3, vec![d1.id]);
        tx.commit().await.unwrap();

        assert_eq!(unread(&store, a.tenant, u0).await, 27);
        assert_eq!(unread(&store, a.tenant, u1).await, 2);
        let mut tx = store.read(a.tenant).await.unwrap();
        let mut counts = tx.notification_unread_counts(&[u0, u1]).await.unwrap();
        counts.sort();
        let mut want = vec![(u0, 27), (u1, 2)];
        want.sort();
        assert_eq!(counts, want);
        let stored = tx.notification(u0, rows[3].id).await.unwrap().unwrap();
        assert_eq!(stored, rows[3]);
        assert!(tx.notification(u1, rows[3].id).await.unwrap().is_none());

        // Pages, newest first by id, with the cursor excluded.
        let mut all = Vec::new();
        let mut before = None;
        loop {
            let page = tx.notifications(u0, before, false, 10).await.unwrap();
            if page.is_empty() {
                break;
            }
            before = page.last().map(|n| n.id);
            all.extend(page);
        }
        assert_eq!(all.len(), 27);
        let got: Vec<NotificationId> = all.iter().map(|n| n.id).collect();
        let mut sorted = got.clone();
        sorted.sort_by(|a, b| b.cmp(a));
        assert_eq!(got, sorted, "newest first");
        assert_eq!(all[0].id, fresh.id);
        assert!(all.iter().all(|n| n.user_id == u0));
        drop(tx);

        // Mark one, then several (one already read), then all.
        let mut tx = store.begin(a.tenant).await.unwrap();
        let at = now();
        let one = tx
            .mark_notifications_read(u0, Some(&[rows[0].id]), at)
            .await
            .unwrap();
        assert_eq!(one, 1);
        let again = tx
            .mark_notifications_read(u0, Some(&[rows[0].id, rows[1].id, rows[2].id]), at)
            .await
            .unwrap();
        assert_eq!(again, 2);
        let read = tx.notification(u0, rows[0].id).await.unwrap().unwrap();
        assert_eq!(read.read_at, Some(at));
        tx.commit().await.unwrap();
        assert_eq!(unread(&store, a.tenant, u0).await, 24);

        let mut tx = store.read(a.tenant).await.unwrap();
        let unread_page = tx.notifications(u0, None, true, 100).await.unwrap();
        assert_eq!(unread_page.len(), 24);
        assert!(unread_page.iter().all(|n| n.read_at.is_none()));
        let cursor = unread_page[9].id;
        let rest = tx.notifications(u0, Some(cursor), true, 100).await.unwrap();
        assert_eq!(rest.len(), 14);
        assert!(rest.iter().all(|n| n.id < cursor));
        drop(tx);

        // Deleting an unread one and a read one.
        let mut tx = store.begin(a.tenant).await.unwrap();
        assert!(tx.delete_notification(u0, rows[5].id).await.unwrap());
        assert!(tx.delete_notification(u0, rows[0].id).await.unwrap());
        assert!(!tx.delete_notification(u0, rows[0].id).await.unwrap());
        tx.commit().await.unwrap();
        assert_eq!(unread(&store, a.tenant, u0).await, 23);

        let mut tx = store.begin(a.tenant).await.unwrap();
        assert_eq!(
            tx.mark_notifications_read(u0, None, now()).await.unwrap(),
            23
        );
        assert_eq!(
            tx.mark_notifications_read(u0, None, now()).await.unwrap(),
            0
        );
        tx.commit().await.unwrap();
        assert_eq!(unread(&store, a.tenant, u0).await, 0);
        assert_eq!(unread(&store, a.tenant, u1).await, 2);
        let mut tx = store.read(a.tenant).await.unwrap();
        assert!(
            tx.notifications(u0, None, true, 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            tx.notifications(u0, None, false, 100).await.unwrap().len(),
            25
        );
    }

    pub(super) async fn notifications_stay_with_their_user_and_tenant(store: Arc<dyn Store>) {
        let svc = Messaging::new(store.clone(), Limits::default());
        let a = dept(&svc, "sdis13", 2).await;
        let b = dept(&svc, "sdis83", 1).await;
        let (u0, u1) = (a.users[0].user_id, a.users[1].user_id);
        let stranger = b.users[0].user_id;

        let mine = notif(u0, "à moi", None);
        let mut tx = store.begin(a.tenant).await.unwrap();
        tx.insert_notifications(std::slice::from_ref(&mine))
            .await
            .unwrap();
        // A recipient of another tenant is never stored through this tenant.
        let foreign = tx
            .insert_notifications(&[notif(stranger, "égaré", None)])
            .await
            .unwrap();
        assert!(foreign.is_empty());
        tx.commit().await.unwrap();

        // Another user of the same tenant.
        let mut tx = store.begin(a.tenant).await.unwrap();
        assert!(tx.notification(u1, mine.id).await.unwrap().is_none());
        assert!(
            tx.notifications(u1, None, false, 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            tx.mark_notifications_read(u1, Some(&[mine.id]), now())
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            tx.mark_notifications_read(u1, None, now()).await.unwrap(),
            0
        );
        assert!(!tx.delete_notification(u1, mine.id).await.unwrap());
        tx.commit().await.unwrap();

        // Another tenant, even naming the right user.
        let mut tx = store.begin(b.tenant).await.unwrap();
        assert!(tx.notification(u0, mine.id).await.unwrap().is_none());
        assert!(
            tx.notifications(u0, None, false, 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            tx.notifications(stranger, None, false, 10)
                .await
                .unwrap()
                .is_empty()
        );
        let counts = tx
            .notification_unread_counts(&[u0, stranger])
            .await
            .unwrap();
        assert!(counts.iter().all(|(_, n)| *n == 0), "{counts:?}");
        assert_eq!(
            tx.mark_notifications_read(u0, Some(&[mine.id]), now())
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            tx.mark_notifications_read(u0, None, now()).await.unwrap(),
            0
        );
        assert!(!tx.delete_notification(u0, mine.id).await.unwrap());
        assert!(tx.user_notification_prefs(&[u0]).await.unwrap().is_empty());
        assert!(!tx.active_user_ids().await.unwrap().contains(&u0));
        tx.commit().await.unwrap();

        let mut tx = store.read(a.tenant).await.unwrap();
        let n = tx.notification(u0, mine.id).await.unwrap().unwrap();
        assert!(n.read_at.is_none());
        assert_eq!(unread(&store, a.tenant, u0).await, 1);
        let active: HashSet<UserId> = tx.active_user_ids().await.unwrap().into_iter().collect();
        let want: HashSet<UserId> = [a.admin.user_id, u0, u1].into_iter().collect();
        assert_eq!(active, want);
    }

    pub(super) async fn notification_prefs_and_tenant_defaults(store: Arc<dyn Store>) {
        let svc = Messaging::new(store.clone(), Limits::default());
        let a = dept(&svc, "sdis13", 2).await;
        let b = dept(&svc, "sdis83", 1).await;
        let (u0, u1) = (a.users[0].user_id, a.users[1].user_id);

        let mut mine = NotificationPrefs::default();
        mine.types.insert(
            kind::FMPA_INVITATION.into(),
            ChannelPrefs {
                in_app: Some(true),
                email: Some(false),
            },
        );
        mine.quiet_hours = Some(QuietHours {
            start: "22:00".into(),
            end: "07:00".into(),
            time_zone: "Europe/Paris".into(),
        });
        let mut tenant = NotificationPrefs::default();
        tenant.types.insert(
            kind::NEW_MESSAGE.into(),
            ChannelPrefs {
                in_app: None,
                email: Some(true),
            },
        );

        let mut tx = store.begin(a.tenant).await.unwrap();
        assert!(tx.tenant_notification_prefs().await.unwrap().is_none());
        assert!(
            tx.user_notification_prefs(&[u0, u1])
                .await
                .unwrap()
                .is_empty()
        );
        tx.set_user_notification_prefs(u0, &mine).await.unwrap();
        tx.set_tenant_notification_prefs(&tenant).await.unwrap();
        tx.commit().await.unwrap();

        let mut tx = store.read(a.tenant).await.unwrap();
        assert_eq!(
            tx.user_notification_prefs(&[u0, u1]).await.unwrap(),
            vec![(u0, mine.clone())]
        );
        assert_eq!(
            tx.tenant_notification_prefs().await.unwrap(),
            Some(tenant.clone())
        );
        drop(tx);

        // Replacing, not merging.
        let mut tx = store.begin(a.tenant).await.unwrap();
        tx.set_user_notification_prefs(u0, &NotificationPrefs::default())
            .await
            .unwrap();
        tx.set_tenant_notification_prefs(&NotificationPrefs::default())
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let mut tx = store.read(a.tenant).await.unwrap();
        assert_eq!(
            tx.user_notification_prefs(&[u0]).await.unwrap(),
            vec![(u0, NotificationPrefs::default())]
        );
        assert_eq!(
            tx.tenant_notification_prefs().await.unwrap(),
            Some(NotificationPrefs::default())
        );
        drop(tx);

        // The other tenant sees neither, and cannot set a user of this one.
        let mut tx = store.begin(b.tenant).await.unwrap();
        assert!(tx.tenant_notification_prefs().await.unwrap().is_none());
        assert!(tx.user_notification_prefs(&[u0]).await.unwrap().is_empty());
        assert!(matches!(
            tx.set_user_notification_prefs(u0, &mine).await,
            Err(Error::NotFound(_))
        ));
        drop(tx);

        // Through the service: the tenant default decides for users without their own.
        let notifier = Notifier::new(store.clone(), NotifyConfig::default());
        let mut tenant_off = NotificationPrefs::default();
        tenant_off.types.insert(
            kind::SYSTEM.into(),
            ChannelPrefs {
                in_app: Some(false),
                email: None,
            },
        );
        notifier
            .set_tenant_defaults(&a.admin, &tenant_off)
            .await
            .unwrap();
        let mut u1_on = NotificationPrefs::default();
        u1_on.types.insert(
            kind::SYSTEM.into(),
            ChannelPrefs {
                in_app: Some(true),
                email: None,
            },
        );
        notifier.set_preferences(&a.users[1], &u1_on).await.unwrap();
        let stored = notifier
            .notify(
                a.tenant,
                &[u0, u1],
                &NewNotification::new(kind::SYSTEM, "Essai", "texte"),
            )
            .await
            .unwrap();
        assert_eq!(
            stored.iter().map(|n| n.user_id).collect::<Vec<_>>(),
            vec![u1]
        );
    }

    pub(super) async fn notifier_over_the_store(store: Arc<dyn Store>) {
        let svc = Messaging::new(store.clone(), Limits::default());
        let a = dept(&svc, "sdis13", 3).await;
        let notifier = Notifier::new(store.clone(), NotifyConfig::default());
        let new = NewNotification::new(kind::SYSTEM, "Exercice", "Exercice NRBC samedi")
            .key("exercice:1");
        let sent = notifier.broadcast(&a.admin, None, &new).await.unwrap();
        assert_eq!(sent, 4, "admin and three users");
        assert_eq!(notifier.broadcast(&a.admin, None, &new).await.unwrap(), 0);
        let me = a.users[0];
        let page = notifier.list(&me, None, false, Some(10)).await.unwrap();
        assert_eq!(page.items.len(), 1);
        assert_eq!(page.unread, 1);
        let (n, unread) = notifier.mark_read(&me, page.items[0].id).await.unwrap();
        assert!(n.read_at.is_some());
        assert_eq!(unread, 0);
        assert_eq!(notifier.unread_count(&me).await.unwrap(), 0);
        assert_eq!(notifier.unread_count(&a.users[1]).await.unwrap(), 1);
        assert!(matches!(
            notifier.mark_read(&a.users[1], n.id).await,
            Err(Error::NotFound(_))
        ));
        assert_eq!(notifier.delete(&me, n.id).await.unwrap(), 0);
        assert_eq!(notifier.mark_all_read(&a.users[1]).await.unwrap(), (1, 0));
    }

    pub(super) async fn notifications_for_a_whole_tenant(store: Arc<dyn Store>) {
        const USERS: usize = 5_000;
        let t = store.create_tenant("sdis59", "SDIS 59").await.unwrap();
        let mut tx = store.begin(t.id).await.unwrap();
        let mut users = Vec::with_capacity(USERS);
        for i in 0..USERS {
            users.push(
                tx.insert_user(&new_user(
                    &format!("sp{i}@sdis59.fr"),
                    &format!("Sapeur {i:04}"),
                    Role::Member,
                ))
                .await
                .unwrap()
                .id,
            );
        }
        tx.commit().await.unwrap();

        let rows: Vec<Notification> = users
            .iter()
            .map(|u| notif(*u, "Alerte", Some("alerte:1")))
            .collect();
        let started = std::time::Instant::now();
        let mut tx = store.begin(t.id).await.unwrap();
        let ids = tx.insert_notifications(&rows).await.unwrap();
        tx.commit().await.unwrap();
        eprintln!("{USERS} notifications stored in {:?}", started.elapsed());
        assert_eq!(ids.len(), USERS);
        let ids: HashSet<NotificationId> = ids.into_iter().collect();
        assert!(rows.iter().all(|r| ids.contains(&r.id)));

        let mut tx = store.begin(t.id).await.unwrap();
        let again = tx.insert_notifications(&rows).await.unwrap();
        assert!(again.is_empty());
        let counts = tx.notification_unread_counts(&users).await.unwrap();
        assert_eq!(counts.len(), USERS);
        assert!(counts.iter().all(|(_, n)| *n == 1));
        tx.commit().await.unwrap();
    }

    fn session(organizer: UserId, title: &str, start: DateTime<Utc>) -> TrainingSession {
        let at = now();
        TrainingSession {
            id: SessionId::new(),
            title: title.into(),
            kind: "ari".into(),
            description: "Port de l'ARI".into(),
            location: "CS Vitrolles".into(),
            start_at: start,
            end_at: start + TimeDelta::hours(3),
            organizer_id: organizer,
            status: SessionStatus::Scheduled,
            reminder_offsets: vec![1440, 60],
            cancel_reason: None,
            created_at: at,
            updated_at: at,
        }
    }

    pub(super) async fn training_sessions_store_update_and_list(store: Arc<dyn Store>) {
        let svc = Messaging::new(store.clone(), Limits::default());
        let a = dept(&svc, "sdis13", 3).await;
        let b = dept(&svc, "sdis83", 1).await;
        let officer = a.admin.user_id;
        let [u0, u1, u2] = [a.users[0].user_id, a.users[1].user_id, a.users[2].user_id];
        let base = now() + TimeDelta::days(1);

        // Five sessions a day apart, two starting at the same instant.
        let mut sessions: Vec<TrainingSession> = (0..4)
            .map(|i| session(officer, &format!("FMPA {i}"), base + TimeDelta::days(i)))
            .collect();
        sessions.push(session(u2, "FMPA bis", base + TimeDelta::days(2)));
        let mut tx = store.begin(a.tenant).await.unwrap();
        for s in &sessions {
            tx.insert_session(s).await.unwrap();
        }
        assert_eq!(
            tx.add_invitees(sessions[1].id, &[u0, u1])
                .await
                .unwrap()
                .len(),
            2
        );
        tx.add_invitees(sessions[3].id, &[u0]).await.unwrap();
        tx.commit().await.unwrap();

        let mut tx = store.begin(a.tenant).await.unwrap();
        assert_eq!(
            tx.session(sessions[0].id).await.unwrap().unwrap(),
            sessions[0]
        );
        let mut changed = sessions[2].clone();
        changed.title = "FMPA 2 — déplacée".into();
        changed.location = "Plateau technique".into();
        changed.start_at = base + TimeDelta::days(5);
        changed.end_at = changed.start_at + TimeDelta::hours(2);
        changed.reminder_offsets = vec![120];
        changed.updated_at = now();
        assert!(tx.update_session(&changed).await.unwrap());
        assert_eq!(tx.session(changed.id).await.unwrap().unwrap(), changed);
        let mut cancelled = sessions[3].clone();
        cancelled.status = SessionStatus::Cancelled;
        cancelled.cancel_reason = Some("Feux de forêt".into());
        assert!(tx.update_session(&cancelled).await.unwrap());
        assert!(
            !tx.update_session(&session(officer, "absente", base))
                .await
                .unwrap()
        );
        tx.commit().await.unwrap();
        sessions[2] = changed;
        sessions[3] = cancelled;

        let mut tx = store.read(a.tenant).await.unwrap();
        let ids = |v: Vec<TrainingSession>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
        // By start, then id; cancelled ones only when asked.
        let mut want: Vec<&TrainingSession> = sessions.iter().collect();
        want.sort_by_key(|s| (s.start_at, s.id));
        let all = tx
            .list_sessions(
                &SessionFilter {
                    include_cancelled: true,
                    ..Default::default()
                },
                100,
            )
            .await
            .unwrap();
        assert_eq!(all.iter().collect::<Vec<_>>(), want);
        let active = ids(tx
            .list_sessions(&SessionFilter::default(), 100)
            .await
            .unwrap());
        assert_eq!(active.len(), 4);
        assert!(!active.contains(&sessions[3].id));

        // Pages through the (start, id) cursor.
        let mut paged = Vec::new();
        let mut filter = SessionFilter {
            include_cancelled: true,
            ..Default::default()
        };
        loop {
            let page = tx.list_sessions(&filter, 2).await.unwrap();
            let Some(last) = page.last() else { break };
            filter.after = Some((last.start_at, last.id));
            paged.extend(page.into_iter().map(|s| s.id));
        }
        assert_eq!(paged, want.iter().map(|s| s.id).collect::<Vec<_>>());

        // A window: [from, to) on the start.
        let window = ids(tx
            .list_sessions(
                &SessionFilter {
                    from: Some(base + TimeDelta::days(1)),
                    to: Some(base + TimeDelta::days(3)),
                    include_cancelled: true,
                    ..Default::default()
                },
                100,
            )
            .await
            .unwrap());
        assert_eq!(window, vec![sessions[1].id, sessions[4].id]);

        // Involving: organiser or invitee.
        let of = |u: UserId, cancelled: bool| SessionFilter {
            involving: Some(u),
            include_cancelled: cancelled,
            ..Default::default()
        };
        assert_eq!(
            ids(tx.list_sessions(&of(u0, true), 100).await.unwrap()),
            vec![sessions[1].id, sessions[3].id]
        );
        assert_eq!(
            ids(tx.list_sessions(&of(u0, false), 100).await.unwrap()),
            vec![sessions[1].id]
        );
        assert_eq!(
            ids(tx.list_sessions(&of(u2, true), 100).await.unwrap()),
            vec![sessions[4].id]
        );
        assert_eq!(
            ids(tx.list_sessions(&of(officer, false), 100).await.unwrap()).len(),
            3
        );
        drop(tx);

        // Another tenant sees none of it.
        let mut tx = store.begin(b.tenant).await.unwrap();
        assert!(tx.session(sessions[0].id).await.unwrap().is_none());
        assert!(
            tx.list_sessions(
                &SessionFilter {
                    include_cancelled: true,
                    ..Default::default()
                },
                100
            )
            .await
            .unwrap()
            .is_empty()
        );
        let mut hijack = sessions[0].clone();
        hijack.title = "volée".into();
        assert!(!tx.update_session(&hijack).await.unwrap());
        assert!(tx.invitees(sessions[1].id).await.unwrap().is_empty());
        assert!(
            tx.add_invitees(sessions[0].id, &[b.users[0].user_id])
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            tx.remove_invitees(sessions[1].id, &[u0])
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            !tx.set_response(sessions[1].id, u0, Attendance::Absent, now())
                .await
                .unwrap()
        );
        tx.commit().await.unwrap();
        let mut tx = store.read(a.tenant).await.unwrap();
        assert_eq!(
            tx.session(sessions[0].id).await.unwrap().unwrap(),
            sessions[0]
        );
        assert_eq!(tx.invitees(sessions[1].id).await.unwrap().len(), 2);
    }

    /// A change holding a session's lock is seen whole by the next one: the second
    /// waits for the first to commit, then reads its write (no lost update).
    pub(super) async fn session_locks_serialise_changes(store: Arc<dyn Store>) {
        let svc = Messaging::new(store.clone(), Limits::default());
        let a = dept(&svc, "sdis13", 1).await;
        let s = session(a.admin.user_id, "FMPA", now() + TimeDelta::days(1));
        let mut tx = store.begin(a.tenant).await.unwrap();
        tx.insert_session(&s).await.unwrap();
        tx.commit().await.unwrap();

        let mut first = store.begin(a.tenant).await.unwrap();
        let mut mine = first.lock_session(s.id, true).await.unwrap().unwrap();
        let (store2, tenant, id) = (store.clone(), a.tenant, s.id);
        let second = tokio::spawn(async move {
            let mut tx = store2.begin(tenant).await.unwrap();
            let seen = tx.lock_session(id, true).await.unwrap().unwrap();
            tx.commit().await.unwrap();
            seen
        });
        // Give the second change time to reach the lock before the first commits.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(
            !second.is_finished(),
            "the second change waits for the lock"
        );
        mine.title = "FMPA déplacée".into();
        first.update_session(&mine).await.unwrap();
        first.commit().await.unwrap();
        let seen = second.await.unwrap();
        assert_eq!(seen.title, "FMPA déplacée");
        // A missing session locks nothing.
        let mut tx = store.begin(a.tenant).await.unwrap();
        assert!(
            tx.lock_session(SessionId::new(), true)
                .await
                .unwrap()
                .is_none()
        );
    }

    pub(super) async fn training_invitees_and_answers(store: Arc<dyn Store>) {
        let svc = Messaging::new(store.clone(), Limits::default());
        let a = dept(&svc, "sdis13", 3).await;
        let b = dept(&svc, "sdis83", 1).await;
        let [u0, u1, u2] = [a.users[0].user_id, a.users[1].user_id, a.users[2].user_id];
        let s = session(
            a.admin.user_id,
            "Secours routier",
            now() + TimeDelta::days(2),
        );

        let mut tx = store.begin(a.tenant).await.unwrap();
        tx.insert_session(&s).await.unwrap();
        let mut added = tx.add_invitees(s.id, &[u2, u0]).await.unwrap();
        added.sort();
        let mut want = vec![u0, u2];
        want.sort();
        assert_eq!(added, want);
        // Idempotent: those already invited are left alone; strangers are not invited.
        let at = now();
        assert!(
            tx.set_response(s.id, u0, Attendance::Present, at)
                .await
                .unwrap()
        );
        let again = tx
            .add_invitees(s.id, &[u0, u1, b.users[0].user_id])
            .await
            .unwrap();
        assert_eq!(again, vec![u1]);
        let inv = tx.invitees(s.id).await.unwrap();
        // By display name: Sapeur 0, Sapeur 1, Sapeur 2.
        assert_eq!(
            inv.iter().map(|i| i.user_id).collect::<Vec<_>>(),
            vec![u0, u1, u2]
        );
        assert_eq!(inv[0].display_name, "Sapeur 0");
        assert_eq!(inv[0].response, Attendance::Present);
        assert_eq!(inv[0].responded_at, Some(at));
        assert_eq!(inv[1].response, Attendance::Pending);
        assert_eq!(inv[1].responded_at, None);

        assert!(
            tx.set_response(s.id, u2, Attendance::Absent, at)
                .await
                .unwrap()
        );
        assert!(
            !tx.set_response(s.id, a.admin.user_id, Attendance::Absent, at)
                .await
                .unwrap()
        );
        let removed = tx
            .remove_invitees(s.id, &[u1, a.admin.user_id])
            .await
            .unwrap();
        assert_eq!(removed, vec![u1]);
        assert!(tx.remove_invitees(s.id, &[u1]).await.unwrap().is_empty());
        assert!(
            !tx.set_response(s.id, u1, Attendance::Present, at)
                .await
                .unwrap()
        );
        tx.commit().await.unwrap();

        let mut tx = store.read(a.tenant).await.unwrap();
        let inv = tx.invitees(s.id).await.unwrap();
        assert_eq!(
            inv.iter()
                .map(|i| (i.user_id, i.response))
                .collect::<Vec<_>>(),
            vec![(u0, Attendance::Present), (u2, Attendance::Absent)]
        );
    }

    pub(super) async fn unread_digest_candidates_and_contents(store: Arc<dyn Store>) {
        let svc = Messaging::new(store.clone(), Limits::default());
        let a = dept(&svc, "sdis13", 3).await;
        let b = dept(&svc, "sdis83", 1).await;
        let [s0, s1, s2] = [a.users[0], a.users[1], a.users[2]];
        let g = svc
            .create_group(&s0, "CS Istres", &[s1.user_id, s2.user_id])
            .await
            .unwrap();
        let (d, _) = svc.open_direct(&s0, s1.user_id).await.unwrap();
        for i in 0..5 {
            svc.send(&s0, g.id, &format!("groupe {i}"), None)
                .await
                .unwrap();
        }
        svc.send(&s0, d.id, "en direct", None).await.unwrap();
        // s2 read everything in the group.
        svc.mark_read(&s2, g.id, None).await.unwrap();
        let later = now() + TimeDelta::minutes(1);
        let earlier = now() - TimeDelta::hours(1);

        let candidates = |store: Arc<dyn Store>, t, since| async move {
            let mut tx = store.read(t).await.unwrap();
            let mut c = tx.digest_candidates(since, 100).await.unwrap();
            c.sort();
            c
        };
        assert_eq!(
            candidates(store.clone(), a.tenant, later).await,
            vec![s1.user_id]
        );
        // Nothing unread is old enough yet.
        assert!(
            candidates(store.clone(), a.tenant, earlier)
                .await
                .is_empty()
        );
        assert!(candidates(store.clone(), b.tenant, later).await.is_empty());

        let mut tx = store.read(a.tenant).await.unwrap();
        let digest = tx.unread_digest(s1.user_id, 10, 3).await.unwrap();
        assert_eq!(digest.len(), 2);
        // Newest activity first: the direct conversation, titled by the other member.
        assert_eq!(digest[0].conversation_id, d.id);
        assert_eq!(digest[0].title, "Sapeur 0");
        assert_eq!(digest[0].unread, 1);
        assert_eq!(digest[0].messages.len(), 1);
        assert_eq!(digest[0].messages[0].0, "Sapeur 0");
        assert_eq!(digest[0].messages[0].1, "en direct");
        assert_eq!(digest[1].conversation_id, g.id);
        assert_eq!(digest[1].title, "CS Istres");
        assert_eq!(digest[1].unread, 5);
        assert_eq!(
            digest[1]
                .messages
                .iter()
                .map(|m| m.1.as_str())
                .collect::<Vec<_>>(),
            vec!["groupe 2", "groupe 3", "groupe 4"]
        );
        assert_eq!(tx.unread_digest(s1.user_id, 1, 1).await.unwrap().len(), 1);
        assert!(
            tx.unread_digest(s2.user_id, 10, 3)
                .await
                .unwrap()
                .is_empty()
        );
        drop(tx);
        // Another tenant sees no digest of s1.
        let mut tx = store.read(b.tenant).await.unwrap();
        assert!(
            tx.unread_digest(s1.user_id, 10, 3)
                .await
                .unwrap()
                .is_empty()
        );
        drop(tx);

        // Once sent, s1 is no candidate until new activity.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let mut tx = store.begin(a.tenant).await.unwrap();
        tx.set_digest_sent(s1.user_id, now()).await.unwrap();
        tx.commit().await.unwrap();
        assert!(candidates(store.clone(), a.tenant, later).await.is_empty());
        let mut tx = store.read(a.tenant).await.unwrap();
        assert!(
            tx.unread_digest(s1.user_id, 10, 3)
                .await
                .unwrap()
                .is_empty()
        );
        drop(tx);

        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        svc.send(&s0, g.id, "nouveau", None).await.unwrap();
        let later = now() + TimeDelta::minutes(1);
        let mut c = candidates(store.clone(), a.tenant, later).await;
        c.sort();
        let mut want = vec![s1.user_id, s2.user_id];
        want.sort();
        assert_eq!(c, want);
        let mut tx = store.read(a.tenant).await.unwrap();
        let digest = tx.unread_digest(s1.user_id, 10, 3).await.unwrap();
        assert_eq!(digest.len(), 1, "only the conversation with new activity");
        assert_eq!(digest[0].conversation_id, g.id);
        assert_eq!(digest[0].unread, 6);
        drop(tx);

        // A later digest mark moves again (upsert), and an inactive user is no candidate.
        let mut tx = store.begin(a.tenant).await.unwrap();
        tx.set_digest_sent(s1.user_id, now() + TimeDelta::seconds(1))
            .await
            .unwrap();
        tx.set_user_active(s2.user_id, false).await.unwrap();
        tx.commit().await.unwrap();
        assert!(candidates(store.clone(), a.tenant, later).await.is_empty());

        let tenants = store.tenant_ids().await.unwrap();
        assert!(tenants.contains(&a.tenant) && tenants.contains(&b.tenant));
    }
}

use fmpa::{
    notification_prefs_and_tenant_defaults, notifications_for_a_whole_tenant,
    notifications_stay_with_their_user_and_tenant, notifications_store_dedupe_page_and_count,
    notifier_over_the_store, session_locks_serialise_changes, training_invitees_and_answers,
    training_sessions_store_update_and_list, unread_digest_candidates_and_contents,
};
