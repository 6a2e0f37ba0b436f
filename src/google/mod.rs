//! Google: the OAuth 2.0 client the vault uses (authorization URL with PKCE,
//! code exchange, refresh, revocation), id_token verification against
//! Google's JWKS, and — with the `google-sim` feature, which the tests turn
//! on — a simulator of Google for tests and dev mode.

mod calls;
mod client;
mod jwt;
#[cfg(feature = "google-sim")]
pub mod sim;

pub use client::{GoogleClient, GoogleError, TokenGrant};
pub use jwt::{IdClaims, JwksCache, JwtError};
