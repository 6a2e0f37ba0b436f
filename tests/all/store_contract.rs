//! Behaviour both store implementations must share.

use std::sync::Arc;

use tokenvault::audit::{Actor, Outcome, verify_chain};
use tokenvault::domain::{ConnectionStatus, Integration, TenantId};
use tokenvault::store::{ConnectionFilter, PageRequest};
use tokenvault::vault::Vault;

use crate::both_backends;
use crate::support::{Backend, seed_connection, spawn_vault};

async fn reconnecting_replaces_the_connection_and_destroys_its_secrets(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let v = &tv.vault;
    let first = seed_connection(
        v,
        "acme",
        "alice",
        Integration::Calendar,
        "ya29.first",
        Some("1//r1"),
    )
    .await;
    let second = seed_connection(
        v,
        "acme",
        "alice",
        Integration::Calendar,
        "ya29.second",
        Some("1//r2"),
    )
    .await;
    assert_ne!(first.id, second.id);

    let old = v.store().connection_get(&first.id).await.unwrap().unwrap();
    assert_eq!(old.status, ConnectionStatus::Deleted);
    assert_eq!(old.google_email, None, "tombstones keep no email");
    assert_eq!(old.google_subject, None);
    assert!(old.granted_scopes.is_empty());
    assert!(
        v.store().secrets_get(&first.id).await.unwrap().is_none(),
        "old DEK and tokens destroyed"
    );

    let opened = v.access_token_open(&second.id).await.unwrap();
    assert_eq!(opened.access_token.expose(), "ya29.second");

    // Another integration of the same account is a separate live connection.
    seed_connection(v, "acme", "alice", Integration::Email, "ya29.mail", None).await;
    let live = v
        .store()
        .connection_list(
            &ConnectionFilter {
                tenant: Some(TenantId::parse("acme").unwrap()),
                ..Default::default()
            },
            &PageRequest {
                after: None,
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(live.len(), 2);
}
both_backends!(
    reconnect_replaces,
    reconnecting_replaces_the_connection_and_destroys_its_secrets
);

async fn listing_pages_through_every_connection_once(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    for i in 0..7 {
        seed_connection(
            &tv.vault,
            "pager",
            &format!("user{i}"),
            Integration::Calendar,
            "ya29.x",
            None,
        )
        .await;
    }
    let filter = ConnectionFilter {
        tenant: Some(TenantId::parse("pager").unwrap()),
        ..Default::default()
    };
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = tv
            .vault
            .store()
            .connection_list(
                &filter,
                &PageRequest {
                    after: after.clone(),
                    limit: 3,
                },
            )
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(|c| c.id.to_string());
        seen.extend(page.into_iter().map(|c| c.id));
    }
    assert_eq!(seen.len(), 7);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, seen, "pages are ordered and disjoint");
}
both_backends!(list_paging, listing_pages_through_every_connection_once);

async fn concurrent_appenders_on_two_vaults_keep_one_verifiable_chain(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let other: Arc<Vault> = Vault::open(&tv.config)
        .await
        .expect("second vault on the same database");
    let mut tasks = Vec::new();
    for (n, vault) in [tv.vault.clone(), other.clone()].into_iter().enumerate() {
        for t in 0..4 {
            let vault = vault.clone();
            tasks.push(tokio::spawn(async move {
                let actor = Actor {
                    identity: format!("replica-{n}"),
                    role: "system".into(),
                };
                for i in 0..50 {
                    vault
                        .audit()
                        .record(
                            &actor,
                            "test.append",
                            &format!("task-{t}"),
                            Outcome::Ok,
                            format!("{i}"),
                        )
                        .await
                        .unwrap();
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let report = verify_chain(
        tv.vault.store().as_ref(),
        tv.vault.keyring().as_ref(),
        1,
        None,
    )
    .await
    .unwrap();
    assert!(report.ok(), "{report:?}");
    assert!(report.entries_checked >= 400, "{report:?}");
    other.shutdown().await;
}
both_backends!(
    audit_chain_concurrency,
    concurrent_appenders_on_two_vaults_keep_one_verifiable_chain
);
