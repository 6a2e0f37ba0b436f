//! The simulator's RS256 signing keys: 2048-bit RSA keys generated with `rsa`,
//! signing with ring, published as a JWKS the way Google publishes its certs.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use rsa::pkcs8::EncodePrivateKey as _;
use rsa::traits::PublicKeyParts as _;
use serde_json::{Value, json};

/// Why a key could not be made or used.
#[derive(Debug, thiserror::Error)]
pub(super) enum KeyError {
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Rng,
    /// `rsa` could not generate a key.
    #[error("RSA key generation failed: {0}")]
    Generate(#[from] rsa::Error),
    /// The generated key could not be encoded as PKCS#8.
    #[error("PKCS#8 encoding of the generated key failed")]
    Encode,
    /// ring refused the generated key.
    #[error("ring rejected the generated key: {0}")]
    Rejected(ring::error::KeyRejected),
    /// ring could not sign.
    #[error("RS256 signing failed")]
    Sign,
}

/// An RSA key pair with its key id.
pub(super) struct SigningKey {
    kid: String,
    pair: RsaKeyPair,
    n: Vec<u8>,
    e: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Generates a fresh 2048-bit key. Takes a noticeable fraction of a second:
    /// call it off the async runtime where that matters.
    pub(super) fn generate() -> Result<Self, KeyError> {
        let system = SystemRandom::new();
        let private = rsa::RsaPrivateKey::new(&mut RingRng(&system), 2048)?;
        // The DER document zeroizes itself when dropped.
        let der = private.to_pkcs8_der().map_err(|_| KeyError::Encode)?;
        let pair = RsaKeyPair::from_pkcs8(der.as_bytes()).map_err(KeyError::Rejected)?;
        let n = private.n().to_bytes_be();
        let e = private.e().to_bytes_be();
        // Google's key ids are 40 hex digits; derive ours from the modulus.
        let kid = hex::encode(&digest(&SHA256, &n).as_ref()[..20]);
        Ok(Self { kid, pair, n, e })
    }

    /// The key id (`kid`).
    pub(super) fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK, in the shape of Google's certs endpoint.
    pub(super) fn jwk(&self) -> Value {
        json!({
            "kty": "RSA",
            "alg": "RS256",
            "use": "sig",
            "kid": self.kid,
            "n": URL_SAFE_NO_PAD.encode(&self.n),
            "e": URL_SAFE_NO_PAD.encode(&self.e),
        })
    }

    /// A compact JWS: header `{alg: RS256, kid, typ: JWT}` over `claims`.
    pub(super) fn sign_jwt(&self, claims: &Value) -> Result<String, KeyError> {
        self.sign_jwt_as(&self.kid, claims)
    }

    /// Like [`Self::sign_jwt`] but naming `kid` in the header, whichever key
    /// that is (for tokens that must fail verification).
    pub(super) fn sign_jwt_as(&self, kid: &str, claims: &Value) -> Result<String, KeyError> {
        let header = json!({"alg": "RS256", "kid": kid, "typ": "JWT"});
        let mut jwt = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0u8; self.pair.public().modulus_len()];
        self.pair
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                jwt.as_bytes(),
                &mut signature,
            )
            .map_err(|_| KeyError::Sign)?;
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(signature));
        Ok(jwt)
    }
}

/// ring's system RNG as the `rand_core` 0.6 RNG that `rsa` 0.9 wants, so key
/// generation does not depend on `rand_core`'s optional `getrandom` feature.
struct RingRng<'a>(&'a SystemRandom);

impl rsa::rand_core::RngCore for RingRng<'_> {
    fn next_u32(&mut self) -> u32 {
        let mut bytes = [0u8; 4];
        self.fill_bytes(&mut bytes);
        u32::from_le_bytes(bytes)
    }

    fn next_u64(&mut self) -> u64 {
        let mut bytes = [0u8; 8];
        self.fill_bytes(&mut bytes);
        u64::from_le_bytes(bytes)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        // `rand_core`'s infallible interface leaves no way to report a failure,
        // and going on with unfilled bytes would make weak (or endlessly
        // retried) primes. Like `rand_core::OsRng`, panic: the OS RNG only fails
        // when the system is unusable for cryptography at all.
        if self.0.fill(dest).is_err() {
            panic!("the system random number generator failed");
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
        self.0
            .fill(dest)
            .map_err(|_| rsa::rand_core::Error::new(KeyError::Rng))
    }
}

impl rsa::rand_core::CryptoRng for RingRng<'_> {}
