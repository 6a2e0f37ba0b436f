//! The key registry from inside one process: root keys checked at every
//! start, a replica that loses a version stops serving and recovers without a
//! restart, leases from cached records never call the keyring provider, no
//! key is written under a retired version, and the PKCS#11 keyring keeps its
//! KEKs inside a real SoftHSM2 token.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokenvault::crypto::{
    CryptoError, Custody, KekMaterialInfo, KekVersion, Key256, KeyringProvider, LocalKeyring,
    MacPurpose,
};
use tokenvault::domain::{Integration, KeyState, Timestamp, VaultError};
use tokenvault::proto::v1 as pb;
use tokenvault::vault::Vault;
use tonic::Code;

use crate::both_backends;
use crate::support::raw::RawDb;
use crate::support::softhsm::{SoftHsm, child_token, run_child_test};
use crate::support::{As, Backend, seed_connection, spawn_vault_with, start_vault};

/// Replaces a file's contents in place, keeping its mode.
fn overwrite(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Why the vault refuses to open with this configuration.
async fn refused(config: &tokenvault::config::Config) -> String {
    match Vault::open(config).await {
        Ok(_) => panic!("the vault opened"),
        Err(e) => e.to_string(),
    }
}

async fn a_keyring_with_another_mac_root_or_signing_key_refuses_to_start(backend: Backend) {
    let Some(mut tv) = spawn_vault_with(backend, |c| c.audit.checkpoint_every = 2).await else {
        return;
    };
    seed_connection(&tv.vault, "t", "u", Integration::Calendar, "ya29.r", None).await;
    tv.stop().await;
    let config = tv.config.clone();
    let raw = RawDb::open(&tv).await;
    let entries = || raw.scalar("SELECT COUNT(*) FROM audit_log");
    let written = entries().await;
    assert_eq!(
        raw.scalar("SELECT COUNT(*) FROM root_key_checks").await,
        2,
        "both key-check values are recorded at the first start"
    );

    // The same KEKs with another MAC root key.
    let path = config.keyring_path();
    let original = std::fs::read(&path).unwrap();
    let mut keyring: serde_json::Value = serde_json::from_slice(&original).unwrap();
    keyring["mac_root_key"] = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY=".into();
    overwrite(&path, &serde_json::to_vec(&keyring).unwrap());
    let err = refused(&config).await;
    assert!(err.contains("MAC root key"), "{err}");
    assert!(err.contains("key-check value differs"), "{err}");
    assert_eq!(
        entries().await,
        written,
        "nothing was written under the wrong key"
    );

    // Before key-check values existed, the log already written is the evidence.
    raw.execute("DELETE FROM root_key_checks").await;
    let err = refused(&config).await;
    assert!(err.contains("MAC root key"), "{err}");
    assert!(err.contains("does not verify"), "{err}");
    assert_eq!(entries().await, written);
    overwrite(&path, &original);
    Vault::open(&config).await.unwrap().shutdown().await;
    assert_eq!(raw.scalar("SELECT COUNT(*) FROM root_key_checks").await, 2);

    // A checkpoint signing key other than the one recorded.
    raw.execute(
        "UPDATE root_key_checks SET check_value = \
         (SELECT check_value FROM root_key_checks WHERE name = 'mac_root') \
         WHERE name = 'checkpoint_signing'",
    )
    .await;
    let written = entries().await;
    let err = refused(&config).await;
    assert!(err.contains("audit checkpoint signing key"), "{err}");
    assert_eq!(entries().await, written);
    raw.close().await;
}
both_backends!(
    root_keys_checked,
    a_keyring_with_another_mac_root_or_signing_key_refuses_to_start
);

/// A second vault on `a`'s database, with a keyring file of its own copied from `a`'s.
async fn second_vault(
    a: &crate::support::TestVault,
    adjust: impl FnOnce(&mut tokenvault::config::Config),
) -> crate::support::TestVault {
    let dir = tempfile::tempdir().unwrap();
    overwrite(
        &dir.path().join("keyring.json"),
        &std::fs::read(a.keyring_path()).unwrap(),
    );
    start_vault(a.backend, dir, a.database_url.clone(), adjust).await
}

/// Asks `a` to rotate over gRPC and checks the refusal names `replica` and changes
/// nothing; returns its message.
async fn rotation_refused_for(a: &crate::support::TestVault, replica: &str) -> String {
    let err = a
        .admin(As::Admin)
        .rotate_keys(pb::RotateKeysRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains(replica), "{}", err.message());
    assert_eq!(a.vault.keys().primary().await.unwrap(), KekVersion::FIRST);
    err.message().to_owned()
}

/// Rotates and waits until the run has completed.
async fn rotate_to_completion(vault: &Vault) {
    vault
        .keys()
        .rotate(&tokenvault::audit::Actor::system())
        .await
        .unwrap();
    crate::support::wait_for_rotation(vault, Duration::from_secs(30)).await;
}

/// Fast registry sync for two vaults in one process.
fn tuned(c: &mut tokenvault::config::Config) {
    c.keyring.sync_interval_ms = 100;
    c.keyring.heartbeat_seconds = 1;
    c.keyring.replica_wait_ms = 1_500;
}

async fn a_replica_that_loses_a_version_stops_serving_and_recovers(backend: Backend) {
    let Some(a) = spawn_vault_with(backend, tuned).await else {
        return;
    };
    // B has a keyring file of its own, copied from A's before any rotation.
    let v1_only = std::fs::read(a.keyring_path()).unwrap();
    let b = second_vault(&a, tuned).await;
    let b_id = b.vault.keys().status().await.unwrap().replica_id;
    let c = seed_connection(&a.vault, "t", "u", Integration::Calendar, "ya29.x", None).await;

    // A creates v2 in its own file; B cannot get it, so v2 does not become primary.
    let refusal = rotation_refused_for(&a, &b_id).await;
    assert!(refusal.contains("v2"), "{refusal}");
    b.vault.health().await.expect("B keeps serving");

    // Given the version, B picks it up without a restart and the rotation goes through.
    overwrite(&b.keyring_path(), &std::fs::read(a.keyring_path()).unwrap());
    // B re-reads its keyring within a sync interval (100 ms here) and records
    // what it holds in the registry, which is what the rotation checks.
    let v2 = KekVersion::new(2).unwrap();
    let limit = Duration::from_secs(10);
    let deadline = Instant::now() + limit;
    loop {
        let held = a
            .vault
            .keys()
            .status()
            .await
            .unwrap()
            .replicas
            .into_iter()
            .find(|(r, _)| r.replica_id == b_id)
            .map(|(r, _)| r.versions);
        if held.as_ref().is_some_and(|v| v.contains(&v2)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B did not record v2 in the registry within {limit:?} of its keyring file \
             gaining it; the registry says it holds {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let run = a
        .admin(As::Admin)
        .rotate_keys(pb::RotateKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .rotation
        .unwrap();
    assert_eq!(run.target_version, 2, "the version prepared earlier");
    crate::support::wait_for_rotation(&a.vault, Duration::from_secs(30)).await;

    // B's file goes back to a copy without v2: within a heartbeat B stops
    // serving, naming the version and what to do; nothing is wrapped under a
    // key it does not have.
    overwrite(&b.keyring_path(), &v1_only);
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        if let Err(e) = b.vault.health().await {
            break e.to_string();
        }
        assert!(Instant::now() < deadline, "B did not notice");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(err.contains("key version v2"), "{err}");
    assert!(err.contains("keyring file"), "{err}");
    let refused = b
        .connections(As::App)
        .begin_authorization(pb::BeginAuthorizationRequest {
            tenant_id: "t".into(),
            account_id: "v".into(),
            integration: pb::Integration::Calendar as i32,
            login_hint: None,
        })
        .await;
    // No Google is configured here: the refusal must come from the keyring or
    // from the missing client, never from a wrap under another key.
    if let Err(e) = refused {
        assert!(
            matches!(e.code(), Code::Unavailable | Code::FailedPrecondition),
            "{e:?}"
        );
    }
    a.vault.health().await.expect("A is unaffected");

    // Restored, B serves again without a restart.
    overwrite(&b.keyring_path(), &std::fs::read(a.keyring_path()).unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.vault.health().await.is_err() {
        assert!(Instant::now() < deadline, "B did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        b.vault
            .access_token_open(&c.id)
            .await
            .unwrap()
            .access_token
            .expose(),
        "ya29.x"
    );
}
both_backends!(
    lost_version,
    a_replica_that_loses_a_version_stops_serving_and_recovers
);

async fn a_different_key_under_a_known_number_is_never_used(backend: Backend) {
    let Some(a) = spawn_vault_with(backend, tuned).await else {
        return;
    };
    let b = second_vault(&a, tuned).await;
    // B's own keyring file gets a v2 of its own, as a concurrent rotation there would.
    b.vault
        .keyring()
        .create_version(KekVersion::new(2).unwrap())
        .await
        .unwrap();
    let b_id = b.vault.keys().status().await.unwrap().replica_id;
    // A's rotation registers its v2; B holds "a v2", but not that one: the
    // rotation is refused and nothing is wrapped under either.
    rotation_refused_for(&a, &b_id).await;
    let status = a.vault.keys().status().await.unwrap();
    let b_row = status
        .replicas
        .iter()
        .find(|(r, _)| r.replica_id == b_id)
        .unwrap();
    assert_eq!(
        b_row.0.versions,
        [KekVersion::FIRST],
        "B does not count its v2"
    );
    b.vault.health().await.expect("B serves on v1");
}
both_backends!(
    same_number_other_key,
    a_different_key_under_a_known_number_is_never_used
);

/// A real local keyring that counts the unwraps it performs.
#[derive(Debug)]
struct Counting {
    inner: LocalKeyring,
    unwraps: AtomicU64,
}

#[async_trait]
impl KeyringProvider for Counting {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn custody(&self) -> Custody {
        self.inner.custody()
    }
    async fn versions(&self) -> Result<Vec<KekMaterialInfo>, CryptoError> {
        self.inner.versions().await
    }
    async fn reload(&self) -> Result<(), CryptoError> {
        self.inner.reload().await
    }
    async fn wrap(&self, v: KekVersion, dek: &Key256, aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.inner.wrap(v, dek, aad).await
    }
    async fn unwrap(&self, v: KekVersion, w: &[u8], aad: &[u8]) -> Result<Key256, CryptoError> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        self.inner.unwrap(v, w, aad).await
    }
    async fn create_version(&self, at_least: KekVersion) -> Result<KekMaterialInfo, CryptoError> {
        self.inner.create_version(at_least).await
    }
    async fn destroy_version(&self, v: KekVersion) -> Result<(), CryptoError> {
        self.inner.destroy_version(v).await
    }
    fn mac(&self, p: MacPurpose, data: &[u8]) -> [u8; 32] {
        self.inner.mac(p, data)
    }
    fn mac_verify(&self, p: MacPurpose, data: &[u8], tag: &[u8]) -> bool {
        self.inner.mac_verify(p, data, tag)
    }
}

async fn counting_vault(
    backend: Backend,
    dir: &Path,
    cache_ttl_seconds: u64,
) -> Option<(
    Arc<Vault>,
    Arc<Counting>,
    Option<crate::support::DropDatabase>,
)> {
    let url = crate::support::fresh_database(backend, dir).await?;
    let guard = crate::support::DropDatabase::new(&url);
    let mut config = crate::support::test_config(dir, &url);
    config.lease.cache_ttl_seconds = cache_ttl_seconds;
    let keyring = Arc::new(Counting {
        inner: LocalKeyring::init(config.keyring_path()).unwrap(),
        unwraps: AtomicU64::new(0),
    });
    let store = tokenvault::store::open(&url).await.unwrap();
    let vault = Vault::from_parts(store, keyring.clone(), &config)
        .await
        .unwrap();
    Some((vault, keyring, guard))
}

async fn tokens_opened_again_do_not_call_the_provider(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some((vault, keyring, _drop)) = counting_vault(backend, dir.path(), 30).await else {
        return;
    };
    let c = seed_connection(&vault, "t", "u", Integration::Calendar, "ya29.c", None).await;
    let opens = || async {
        for _ in 0..5 {
            let t = vault.access_token_open(&c.id).await.unwrap();
            assert_eq!(t.access_token.expose(), "ya29.c");
        }
    };
    let before = keyring.unwraps.load(Ordering::SeqCst);
    opens().await;
    assert_eq!(
        keyring.unwraps.load(Ordering::SeqCst) - before,
        1,
        "one unwrap, then the cached DEK"
    );

    // Rewrapped by a rotation: the cached DEK is dropped and opened anew once.
    rotate_to_completion(&vault).await;
    let before = keyring.unwraps.load(Ordering::SeqCst);
    opens().await;
    assert_eq!(keyring.unwraps.load(Ordering::SeqCst) - before, 1);
    vault.shutdown().await;

    // With the cache turned off, every open unwraps.
    let dir = tempfile::tempdir().unwrap();
    let Some((vault, keyring, _drop)) = counting_vault(backend, dir.path(), 0).await else {
        return;
    };
    let c = seed_connection(&vault, "t", "u", Integration::Calendar, "ya29.d", None).await;
    let before = keyring.unwraps.load(Ordering::SeqCst);
    for _ in 0..5 {
        vault.access_token_open(&c.id).await.unwrap();
    }
    assert_eq!(keyring.unwraps.load(Ordering::SeqCst) - before, 5);
    vault.shutdown().await;
}
both_backends!(dek_cache, tokens_opened_again_do_not_call_the_provider);

async fn a_deletion_on_one_replica_empties_the_others_caches(backend: Backend) {
    let Some(a) = spawn_vault_with(backend, |c| c.events.poll_interval_ms = 50).await else {
        return;
    };
    let b = second_vault(&a, |c| c.events.poll_interval_ms = 50).await;
    let c = seed_connection(&a.vault, "t", "u", Integration::Calendar, "ya29.gone", None).await;
    b.vault.access_token_open(&c.id).await.unwrap();
    assert_eq!(b.vault.keys().cached_deks(), 1, "B holds the DEK it opened");
    a.vault
        .delete(
            &tokenvault::audit::Actor::system(),
            tokenvault::store::DeletionTarget::Connection(c.id.clone()),
            tokenvault::domain::DeletionReason::UserDisconnected,
            "",
        )
        .await
        .unwrap();
    // B learns of the deletion from the event log, well before its cache TTL.
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.vault.keys().cached_deks() != 0 {
        assert!(
            Instant::now() < deadline,
            "B still holds the deleted connection's DEK"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
both_backends!(
    deletion_empties_caches,
    a_deletion_on_one_replica_empties_the_others_caches
);

async fn a_key_wrapped_under_a_former_primary_is_not_stored(backend: Backend) {
    let Some(tv) = spawn_vault_with(backend, |_| {}).await else {
        return;
    };
    let old = seed_connection(&tv.vault, "t", "u1", Integration::Calendar, "ya29.1", None).await;
    let keys = tv.vault.keys();
    let system = tokenvault::audit::Actor::system();
    rotate_to_completion(&tv.vault).await;
    let store = tv.vault.store();
    assert_eq!(
        keys.status().await.unwrap().versions[0].record.state,
        KeyState::Active
    );

    // A replica that read the old primary just before the switch tries to
    // store a pending authorization wrapped by it: refused, nothing stored,
    // so the rotation that already finished left nothing behind.
    let secrets = store.secrets_get(&old.id).await.unwrap().unwrap();
    let record = tokenvault::store::AuthzStateRecord {
        state_hash: vec![7; 32],
        tenant: tokenvault::domain::TenantId::parse("t").unwrap(),
        account: tokenvault::domain::AccountId::parse("u2").unwrap(),
        integration: Integration::Calendar,
        caller: "test".into(),
        kek_version: KekVersion::FIRST,
        wrapped_dek: secrets.wrapped_dek.clone(),
        sealed_verifier: vec![1, 2, 3],
        created_at: Timestamp::now(),
        expires_at: Timestamp::now().plus(Duration::from_secs(600)),
    };
    for _ in 0..2 {
        let err = store.authz_insert(&record, 10).await.unwrap_err();
        assert!(
            matches!(err, VaultError::KeyVersionChanged(v) if v == KekVersion::FIRST),
            "{err:?}"
        );
        let counts = store.wrapped_key_counts().await.unwrap();
        assert!(
            counts.iter().all(|c| c.version != KekVersion::FIRST),
            "{counts:?}"
        );
        // Retiring right after the rotation succeeds; a retired version is refused too.
        keys.retire(KekVersion::FIRST, &system).await.unwrap();
    }
    // Under the primary the same write goes through.
    let v2 = KekVersion::new(2).unwrap();
    store
        .authz_insert(
            &tokenvault::store::AuthzStateRecord {
                kek_version: v2,
                ..record
            },
            10,
        )
        .await
        .unwrap();
}
both_backends!(
    former_primary_guard,
    a_key_wrapped_under_a_former_primary_is_not_stored
);

/// The PKCS#11 provider against a real SoftHSM2 token. The body runs in a
/// child copy of this test binary that sees the token (SoftHSM reads its
/// configuration once per process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pkcs11_keyring_keeps_its_keks_inside_the_token() {
    let Some((label, module)) = child_token() else {
        let Some(hsm) = SoftHsm::new("tv-provider") else {
            return;
        };
        run_child_test(
            "key_registry::the_pkcs11_keyring_keeps_its_keks_inside_the_token",
            &hsm,
        );
        return;
    };
    use tokenvault::crypto::{Pkcs11Keyring, Pkcs11Settings, SecretString};
    let settings = |prefix: &str| Pkcs11Settings {
        module: module.clone(),
        token_label: label.clone(),
        pin: SecretString::new(crate::support::softhsm::PIN.to_owned()),
        label_prefix: prefix.to_owned(),
        max_sessions: 2,
    };
    assert!(!Pkcs11Keyring::token_has_keys(&settings("tv")).unwrap());
    let e = Pkcs11Keyring::open(&settings("tv"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("keyring.pkcs11.label_prefix") && e.contains("keys init"),
        "{e}"
    );
    let keyring = Pkcs11Keyring::init(&settings("tv")).unwrap();
    assert!(Pkcs11Keyring::token_has_keys(&settings("tv")).unwrap());
    assert!(
        Pkcs11Keyring::init(&settings("tv")).is_err(),
        "never a second set"
    );
    assert_eq!(keyring.kind(), "pkcs11");
    let v1 = KekVersion::FIRST;
    let dek = Key256::generate(tokenvault::crypto::rng()).unwrap();
    let wrapped = keyring.wrap(v1, &dek, b"ctx").await.unwrap();
    assert_eq!(wrapped.len(), 60);
    let back = keyring.unwrap(v1, &wrapped, b"ctx").await.unwrap();
    assert_eq!(format!("{back:?}"), "Key256([redacted])");
    // The round trip is exact: what the original DEK sealed, the unwrapped one opens.
    use tokenvault::crypto::{DekContext, TokenKind, open, seal};
    let ctx = DekContext {
        tenant: "t",
        account: "a",
        connection: "c",
    }
    .token(TokenKind::Access);
    let sealed = seal(&dek, &ctx, b"ya29.inside").unwrap();
    assert_eq!(open(&back, &ctx, &sealed).unwrap().expose(), b"ya29.inside");
    // Wrong associated data, a changed byte: refused as tampered.
    assert!(matches!(
        keyring.unwrap(v1, &wrapped, b"other").await,
        Err(CryptoError::Decrypt)
    ));
    let mut bad = wrapped.clone();
    bad[20] ^= 1;
    assert!(matches!(
        keyring.unwrap(v1, &bad, b"ctx").await,
        Err(CryptoError::Decrypt)
    ));
    assert!(matches!(
        keyring
            .unwrap(KekVersion::new(9).unwrap(), &wrapped, b"ctx")
            .await,
        Err(CryptoError::UnknownKeyVersion(_))
    ));

    // The KEK objects are sensitive and never extractable: the module refuses their value.
    {
        use cryptoki::context::Pkcs11;
        use cryptoki::object::{Attribute, AttributeType, ObjectClass};
        use cryptoki::session::UserType;
        let ctx = Pkcs11::new(&module).unwrap();
        // Initialised already by the keyring in this process.
        let _ = ctx.initialize(cryptoki::context::CInitializeArgs::new(
            cryptoki::context::CInitializeFlags::OS_LOCKING_OK,
        ));
        let slot = ctx
            .get_slots_with_initialized_token()
            .unwrap()
            .into_iter()
            .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == label)
            .unwrap();
        let session = ctx.open_ro_session(slot).unwrap();
        let pin = cryptoki::types::AuthPin::from(crate::support::softhsm::PIN.to_owned());
        let _ = session.login(UserType::User, Some(&pin));
        let handles = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(b"tv/kek/v1".to_vec()),
            ])
            .unwrap();
        assert_eq!(handles.len(), 1);
        let attrs = session
            .get_attributes(
                handles[0],
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                ],
            )
            .unwrap();
        for a in &attrs {
            match a {
                Attribute::Sensitive(v) => assert!(*v),
                Attribute::Extractable(v) => assert!(!*v),
                Attribute::NeverExtractable(v) => assert!(*v),
                _ => {}
            }
        }
        let value = session.get_attributes(handles[0], &[AttributeType::Value]);
        assert!(
            !matches!(value.as_deref(), Ok([Attribute::Value(_)])),
            "the KEK's value was readable: {value:?}"
        );
    }

    // Versions: created with the number the registry allows, destroyed for good.
    let v3 = KekVersion::new(3).unwrap();
    let info = keyring.create_version(v3).await.unwrap();
    assert_eq!(info.version, v3, "at_least is honoured");
    let w3 = keyring.wrap(v3, &back, b"ctx").await.unwrap();
    assert_eq!(
        keyring
            .create_version(KekVersion::FIRST)
            .await
            .unwrap()
            .version
            .get(),
        4
    );
    let other = Pkcs11Keyring::open(&settings("tv")).unwrap();
    let held: Vec<u32> = other
        .versions()
        .await
        .unwrap()
        .iter()
        .map(|m| m.version.get())
        .collect();
    assert_eq!(held, [1, 3, 4]);
    assert_eq!(
        other.mac(MacPurpose::AuditChain, b"m"),
        keyring.mac(MacPurpose::AuditChain, b"m"),
        "the MAC subkeys come from the one root in the token"
    );
    keyring.destroy_version(v3).await.unwrap();
    assert!(matches!(
        keyring.unwrap(v3, &w3, b"ctx").await,
        Err(CryptoError::UnknownKeyVersion(_))
    ));
    // The other handle learns of it: at once when its stale handle fails, or on reload.
    let stale = other.unwrap(v3, &w3, b"ctx").await;
    assert!(
        matches!(stale, Err(CryptoError::UnknownKeyVersion(_))),
        "{stale:?}"
    );
    other.reload().await.unwrap();
    assert!(
        other
            .versions()
            .await
            .unwrap()
            .iter()
            .all(|m| m.version != v3)
    );
    // Another prefix is another, empty set of keys in the same token.
    assert!(!Pkcs11Keyring::token_has_keys(&settings("other")).unwrap());
}
