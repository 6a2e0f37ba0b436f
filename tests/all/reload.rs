//! `SIGHUP` reloads the API keys with the policy, from the same
//! configuration file: a key removed from `[[auth.api_keys]]` stops working
//! without a restart while the others keep working, a configuration that no
//! longer validates changes nothing, and the audit log names the keys that
//! came and went (by identity and hash prefix, never the key).

use std::time::{Duration, Instant};

use tokenvault::config::ApiKeyConfig;
use tokenvault::grpc::Authenticator;
use tokenvault::proto::v1 as pb;
use tokenvault::proto::v1::admin_service_client::AdminServiceClient;
use tokenvault::proto::v1::connection_service_client::ConnectionServiceClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::serve_cli::ServeProcess;
use crate::support::{As, Backend, Bearer, spawn_vault, write_config_file};

fn bearer(who: As) -> Bearer {
    Bearer(Some(
        format!("Bearer {}", who.key()).parse().expect("ascii key"),
    ))
}

/// An app call: lists tenant acme's connections as `who`.
async fn list_as(channel: &Channel, who: As) -> Result<(), tonic::Status> {
    ConnectionServiceClient::with_interceptor(channel.clone(), bearer(who))
        .list_connections(pb::ListConnectionsRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .map(drop)
}

/// The audit entries with `action`, oldest first, read as the auditor.
async fn audit_entries(channel: &Channel, action: &str) -> Vec<pb::AuditEntry> {
    AdminServiceClient::with_interceptor(channel.clone(), bearer(As::Auditor))
        .query_audit(pb::QueryAuditRequest {
            action: Some(action.to_owned()),
            ..Default::default()
        })
        .await
        .expect("query the audit log as the auditor")
        .into_inner()
        .entries
}

/// Polls the audit log until it holds `n` entries with `action`.
async fn wait_for_entries(
    server: &ServeProcess,
    channel: &Channel,
    action: &str,
    n: usize,
) -> Vec<pb::AuditEntry> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let entries = audit_entries(channel, action).await;
        if entries.len() >= n {
            return entries;
        }
        assert!(
            Instant::now() < deadline,
            "no {action} entry number {n} within 10 s of SIGHUP; log:\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_api_keys_and_audits_what_changed() {
    // Create the database and keyring in-process, then serve them from the
    // binary with a configuration file.
    let Some(mut tv) = spawn_vault(Backend::Sqlite).await else {
        return;
    };
    tv.stop().await;
    let dir = tv.dir.path();
    let config_path = write_config_file(dir, &tv.config, "");
    let server = ServeProcess::start(
        dir,
        &["--config", config_path.to_str().expect("utf-8 path")],
        &[],
    );
    let channel = Channel::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .expect("connect to tokenvault serve");

    list_as(&channel, As::App)
        .await
        .expect("the app's key works before the reload");

    // The app's key is removed from the configuration file.
    let app_hash = Authenticator::hash_api_key(&As::App.key());
    let mut without_app = tv.config.clone();
    without_app
        .auth
        .api_keys
        .retain(|k| k.identity != As::App.identity());
    assert_eq!(
        without_app.auth.api_keys.len(),
        tv.config.auth.api_keys.len() - 1
    );
    write_config_file(dir, &without_app, "");
    server.signal("HUP");
    let reloads = wait_for_entries(&server, &channel, "auth.reload", 1).await;

    let err = list_as(&channel, As::App)
        .await
        .expect_err("the removed key still works after the reload");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // Another key still authenticates (the auditor's did, to read the log).
    AdminServiceClient::with_interceptor(channel.clone(), bearer(As::Admin))
        .list_connections(pb::AdminServiceListConnectionsRequest::default())
        .await
        .expect("the admin's key still works after the reload");

    let [entry] = reloads.as_slice() else {
        panic!("one auth.reload entry per reload: {reloads:?}");
    };
    assert_eq!(entry.actor, tokenvault::audit::Actor::system().identity);
    assert_eq!(entry.outcome, pb::AuditOutcome::Success as i32);
    assert_eq!(
        entry.detail,
        format!(
            "api_keys added=[] removed=[{} sha256:{}] now {} keys",
            As::App.identity(),
            &app_hash[..8],
            without_app.auth.api_keys.len()
        )
    );
    assert!(
        !entry.detail.contains(&app_hash) && !entry.detail.contains(&As::App.key()),
        "the audit log holds the key or its whole hash: {}",
        entry.detail
    );

    // A configuration that does not validate (the app's key back, next to a
    // malformed one) is refused whole: the app's key stays removed.
    let mut invalid = tv.config.clone();
    invalid.auth.api_keys.push(ApiKeyConfig {
        identity: "broken".to_owned(),
        sha256: "not-a-sha256".to_owned(),
    });
    write_config_file(dir, &invalid, "");
    server.signal("HUP");
    let policy_reloads = wait_for_entries(&server, &channel, "policy.reload", 2).await;
    let refused = &policy_reloads[1];
    assert_eq!(
        refused.outcome,
        pb::AuditOutcome::Failure as i32,
        "{refused:?}"
    );
    assert!(
        refused.detail.contains("auth.api_keys"),
        "the refusal does not say why: {}",
        refused.detail
    );
    let err = list_as(&channel, As::App)
        .await
        .expect_err("a refused reload brought the app's key back");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(audit_entries(&channel, "auth.reload").await.len(), 1);

    // The valid configuration with the key brings it back, audited as added.
    write_config_file(dir, &tv.config, "");
    server.signal("HUP");
    let reloads = wait_for_entries(&server, &channel, "auth.reload", 2).await;
    assert!(
        reloads[1].detail.starts_with(&format!(
            "api_keys added=[{} sha256:{}] removed=[]",
            As::App.identity(),
            &app_hash[..8]
        )),
        "{}",
        reloads[1].detail
    );
    list_as(&channel, As::App)
        .await
        .expect("the app's key works again after the reload");
}
