//! Envelope-encryption micro-benchmarks: seal+open of a 2 KiB token, DEK
//! wrap+unwrap (one rewrap) under the local keyring, and the cost of one DEK
//! unwrap per keyring provider: local (in memory) and pkcs11 (SoftHSM2, a
//! token made for the run; the benchmark re-runs itself with `SOFTHSM2_CONF`
//! pointing at it). The unwrap is what a lease would pay per call if it went
//! to the provider; the vault's DEK cache is what keeps it off the hot path.
//!
//! `cargo bench --bench envelope` (release build). Prints one line per case.

use std::time::Instant;

use tokenvault::crypto::{
    DekContext, KekVersion, KeyringProvider, LocalKeyring, Pkcs11Keyring, Pkcs11Settings,
    SecretString, TokenContext, TokenKind, generate_dek, open, seal, unwrap_dek, wrap_dek,
};

#[path = "common/mod.rs"]
mod common;

fn report(name: &str, iterations: u32, elapsed: std::time::Duration) {
    let per = elapsed / iterations;
    let rate = f64::from(iterations) / elapsed.as_secs_f64();
    println!("{name:<40} {per:>10.2?}/op  {rate:>12.0} ops/s  ({iterations} iterations)");
}

/// Sequential unwraps of one wrapped DEK through `provider`, on a
/// multi-threaded runtime like the server's.
fn unwrap_cost(rt: &tokio::runtime::Runtime, name: &str, provider: &dyn KeyringProvider, n: u32) {
    let dek = generate_dek().unwrap();
    let dctx = DekContext {
        tenant: "tenant-0042",
        account: "account-12345",
        connection: "conn_7d2f8a1e-6c1b-4c1e-9a7e-2f6d3b5c9e10",
    };
    let elapsed = rt.block_on(async {
        let wrapped = wrap_dek(provider, KekVersion::FIRST, &dek, &dctx)
            .await
            .unwrap();
        for _ in 0..n / 10 {
            std::hint::black_box(unwrap_dek(provider, &wrapped, &dctx).await.unwrap());
        }
        let start = Instant::now();
        for _ in 0..n {
            std::hint::black_box(unwrap_dek(provider, &wrapped, &dctx).await.unwrap());
        }
        start.elapsed()
    });
    report(&format!("DEK unwrap, {name} keyring"), n, elapsed);
}

fn main() {
    // First: a pkcs11 measurement needs this process to start with a token.
    let hsm = common::softhsm_token();
    let dek = generate_dek().unwrap();
    let ctx = TokenContext {
        tenant: "tenant-0042",
        account: "account-12345",
        connection: "conn_7d2f8a1e-6c1b-4c1e-9a7e-2f6d3b5c9e10",
        kind: TokenKind::Access,
    };
    let token = vec![0x61u8; 2048];

    // Warm up, then measure seal+open round trips.
    for _ in 0..1000 {
        let sealed = seal(&dek, &ctx, &token).unwrap();
        std::hint::black_box(open(&dek, &ctx, &sealed).unwrap());
    }
    let n = 100_000;
    let start = Instant::now();
    for _ in 0..n {
        let sealed = seal(&dek, &ctx, std::hint::black_box(&token)).unwrap();
        std::hint::black_box(open(&dek, &ctx, &sealed).unwrap());
    }
    report("seal+open 2 KiB token", n, start.elapsed());

    let dir = tempfile::tempdir().unwrap();
    let keyring = LocalKeyring::init(dir.path().join("keyring.json")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let dctx = DekContext {
        tenant: ctx.tenant,
        account: ctx.account,
        connection: ctx.connection,
    };
    let v1 = KekVersion::FIRST;
    let n = 200_000;
    let elapsed = rt.block_on(async {
        let mut wrapped = wrap_dek(&keyring, v1, &dek, &dctx).await.unwrap();
        let start = Instant::now();
        for _ in 0..n {
            let plain = unwrap_dek(&keyring, &wrapped, &dctx).await.unwrap();
            wrapped = wrap_dek(&keyring, v1, &plain, &dctx).await.unwrap();
        }
        start.elapsed()
    });
    report("DEK unwrap+wrap (one rewrap, crypto only)", n, elapsed);

    let rt = tokio::runtime::Builder::new_multi_thread().build().unwrap();
    unwrap_cost(&rt, "local", &keyring, 200_000);
    match hsm {
        Some(token) => {
            let keyring = Pkcs11Keyring::init(&Pkcs11Settings {
                module: token.module,
                token_label: token.label,
                pin: SecretString::new(common::SOFTHSM_PIN.to_owned()),
                label_prefix: "envelope-bench".into(),
                max_sessions: 4,
            })
            .unwrap();
            unwrap_cost(&rt, "pkcs11 (SoftHSM2)", &keyring, 20_000);
        }
        None => println!("DEK unwrap, pkcs11 keyring: skipped (SoftHSM2 is not installed)"),
    }
}
