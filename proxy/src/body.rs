//! Body types of the proxy: one boxed body type for everything it sends, and helpers
//! for small fixed bodies.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

/// Any error a body may yield.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type sent upstream and downstream.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body of fixed bytes.
pub fn full(data: impl Into<Bytes>) -> ProxyBody {
    Full::new(data.into()).map_err(|never| match never {}).boxed_unsync()
}

/// An empty body.
pub fn empty() -> ProxyBody {
    full(Bytes::new())
}

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}
