//! Envelope-encryption micro-benchmarks: seal+open of a 2 KiB token, and DEK
//! wrap+unwrap (one rewrap) under the local keyring.
//!
//! `cargo bench --bench envelope` (release build). Prints one line per case.

use std::time::Instant;

use tokenvault::crypto::{
    DekContext, KekVersion, LocalKeyring, TokenContext, TokenKind, generate_dek, open, seal,
    unwrap_dek, wrap_dek,
};

fn report(name: &str, iterations: u32, elapsed: std::time::Duration) {
    let per = elapsed / iterations;
    let rate = f64::from(iterations) / elapsed.as_secs_f64();
    println!("{name:<40} {per:>10.2?}/op  {rate:>12.0} ops/s  ({iterations} iterations)");
}

fn main() {
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
}
