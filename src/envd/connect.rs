//! The Connect RPC protocol over HTTP/1.1, as the SDK's client speaks it:
//! codecs (protobuf JSON and binary protobuf), the streaming envelope
//! framing with its end-of-stream message, error codes and their HTTP
//! statuses, and the axum responses built from them.
//!
//! Unary calls: `POST /<service>/<method>` with `content-type:
//! application/json` (or `application/proto`); the reply is the message in
//! the same codec, or an error as JSON `{"code", "message"}` with the HTTP
//! status of the code. Streams: `application/connect+json` (or
//! `+proto`); the request and every reply message are enveloped (1 flag
//! byte, 4-byte big-endian length); the last envelope has flag
//! [`END_STREAM`] and carries JSON `{}` or `{"error": {...}}`.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use std::time::Duration;
use tokio::sync::mpsc;

/// Envelope flag: the payload is compressed.
pub const COMPRESSED: u8 = 0b01;
/// Envelope flag: this is the end-of-stream message.
pub const END_STREAM: u8 = 0b10;
/// Length of an envelope header.
pub const ENVELOPE_HEADER: usize = 5;
/// Largest request message we accept.
pub const MAX_MESSAGE: usize = 16 << 20;

/// Errors of the Connect framing (turned into [`RpcError`]s for clients).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The envelope is shorter than its header says.
    #[error("truncated envelope: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes the header announces (with the header).
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// A message larger than [`MAX_MESSAGE`].
    #[error("message of {0} bytes is larger than the limit of {MAX_MESSAGE}")]
    TooLarge(usize),
}

/// A Connect error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Code {
    Canceled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl Code {
    /// The code's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status a unary error with this code is sent with (the
    /// Connect protocol's table).
    pub fn http_status(self) -> StatusCode {
        match self {
            Code::Canceled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                StatusCode::BAD_REQUEST
            }
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }
}

/// An error answered to an RPC.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct RpcError {
    /// The Connect code.
    pub code: Code,
    /// A message for people.
    pub message: String,
}

impl RpcError {
    /// An error with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
        }
    }

    /// The error as the JSON object Connect uses.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code.as_str(), "message": self.message})
    }

    /// Maps an I/O error on `what` to the closest code (not found,
    /// permission denied, already exists, out of space, ...).
    pub fn io(what: impl std::fmt::Display, e: &std::io::Error) -> RpcError {
        use std::io::ErrorKind as K;
        let code = match e.kind() {
            K::NotFound => Code::NotFound,
            K::PermissionDenied => Code::PermissionDenied,
            K::AlreadyExists => Code::AlreadyExists,
            K::InvalidInput | K::NotADirectory | K::IsADirectory | K::DirectoryNotEmpty => {
                Code::InvalidArgument
            }
            K::StorageFull | K::QuotaExceeded => Code::ResourceExhausted,
            _ => Code::Internal,
        };
        RpcError::new(code, format!("{what}: {e}"))
    }
}

impl From<Error> for RpcError {
    fn from(e: Error) -> RpcError {
        RpcError::new(Code::InvalidArgument, e.to_string())
    }
}

/// What every message type of the agent's services can do.
pub trait Msg:
    prost::Message + Default + serde::Serialize + serde::de::DeserializeOwned + Send + 'static
{
}
impl<T> Msg for T where
    T: prost::Message + Default + serde::Serialize + serde::de::DeserializeOwned + Send + 'static
{
}

/// A message codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Protobuf's JSON mapping (`application/json`, `application/connect+json`).
    Json,
    /// Binary protobuf (`application/proto`, `application/connect+proto`).
    Proto,
}

/// Whether a request is unary or a stream, and in which codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    /// The codec.
    pub codec: Codec,
    /// Enveloped (`application/connect+...`).
    pub stream: bool,
}

impl Kind {
    /// Parses a request's content type (parameters such as `charset` are
    /// ignored); `None` for anything that isn't Connect.
    pub fn from_content_type(ct: &str) -> Option<Kind> {
        let ct = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let (codec, stream) = match ct.as_str() {
            "application/json" => (Codec::Json, false),
            "application/proto" => (Codec::Proto, false),
            "application/connect+json" => (Codec::Json, true),
            "application/connect+proto" => (Codec::Proto, true),
            _ => return None,
        };
        Some(Kind { codec, stream })
    }

    /// The content type of replies.
    pub fn content_type(self) -> &'static str {
        match (self.codec, self.stream) {
            (Codec::Json, false) => "application/json",
            (Codec::Proto, false) => "application/proto",
            (Codec::Json, true) => "application/connect+json",
            (Codec::Proto, true) => "application/connect+proto",
        }
    }
}

impl Codec {
    /// Decodes a message.
    pub fn decode<T: Msg>(self, data: &[u8]) -> Result<T, RpcError> {
        match self {
            Codec::Json => {
                // An empty body is the empty message.
                if data.iter().all(u8::is_ascii_whitespace) {
                    return Ok(T::default());
                }
                serde_json::from_slice(data).map_err(|e| {
                    RpcError::new(Code::InvalidArgument, format!("invalid JSON message: {e}"))
                })
            }
            Codec::Proto => T::decode(data).map_err(|e| {
                RpcError::new(
                    Code::InvalidArgument,
                    format!("invalid protobuf message: {e}"),
                )
            }),
        }
    }

    /// Encodes a message.
    pub fn encode<T: Msg>(self, msg: &T) -> Bytes {
        match self {
            // Serializing generated messages into memory cannot fail; an
            // empty object is a safe fallback all the same.
            Codec::Json => serde_json::to_vec(msg)
                .map(Bytes::from)
                .unwrap_or_else(|_| Bytes::from_static(b"{}")),
            Codec::Proto => Bytes::from(msg.encode_to_vec()),
        }
    }
}

/// Frames `data` as one envelope with `flags`.
pub fn envelope(flags: u8, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(ENVELOPE_HEADER + data.len());
    b.put_u8(flags);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    b.freeze()
}

/// A parsed envelope: flags, payload, bytes used (header included).
pub type Envelope<'a> = (u8, &'a [u8], usize);

/// Parses the envelope at the start of `buf`: `Ok(None)` if `buf` doesn't
/// hold a whole one yet, else its flags, payload and total length.
pub fn parse_envelope(buf: &[u8]) -> Result<Option<Envelope<'_>>, Error> {
    let Some(hdr) = buf.get(..ENVELOPE_HEADER) else {
        return Ok(None);
    };
    let flags = hdr[0];
    let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(Error::TooLarge(len));
    }
    match buf.get(ENVELOPE_HEADER..ENVELOPE_HEADER + len) {
        Some(data) => Ok(Some((flags, data, ENVELOPE_HEADER + len))),
        None => Ok(None),
    }
}

/// The single enveloped message of a server-streaming request body.
pub fn single_envelope(body: &[u8]) -> Result<&[u8], RpcError> {
    match parse_envelope(body)? {
        Some((flags, _, _)) if flags & COMPRESSED != 0 => Err(RpcError::new(
            Code::Unimplemented,
            "compressed messages are not supported; send identity encoding",
        )),
        Some((_, data, _)) => Ok(data),
        None => {
            let need = match body.get(1..ENVELOPE_HEADER) {
                Some(l) => u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize + ENVELOPE_HEADER,
                None => ENVELOPE_HEADER,
            };
            Err(Error::Truncated {
                need,
                have: body.len(),
            }
            .into())
        }
    }
}

/// The end-of-stream envelope, with `err` if the stream failed.
pub fn end_stream(err: Option<&RpcError>) -> Bytes {
    let body = match err {
        Some(e) => serde_json::json!({"error": e.to_json()}),
        None => serde_json::json!({}),
    };
    envelope(END_STREAM, body.to_string().as_bytes())
}

/// The reply to a failed unary call.
pub fn error_response(err: &RpcError) -> Response {
    (
        err.code.http_status(),
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        err.to_json().to_string(),
    )
        .into_response()
}

/// The reply to a unary call.
pub fn unary_response<T: Msg>(codec: Codec, res: Result<T, RpcError>) -> Response {
    match res {
        Ok(msg) => {
            let ct = Kind {
                codec,
                stream: false,
            }
            .content_type();
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, HeaderValue::from_static(ct))],
                codec.encode(&msg),
            )
                .into_response()
        }
        Err(e) => error_response(&e),
    }
}

/// A streaming reply: every `Ok` from `rx` becomes an envelope; the
/// stream ends at the first `Err` (sent in the end-of-stream message) or
/// when all senders are gone. Dropping the body (the client went away)
/// closes `rx`, which the producers see as failed sends.
pub fn stream_response<T: Msg>(codec: Codec, rx: mpsc::Receiver<Result<T, RpcError>>) -> Response {
    let body = futures_util::stream::unfold(Some(rx), move |state| async move {
        let mut rx = state?;
        match rx.recv().await {
            Some(Ok(msg)) => {
                let frame = envelope(0, &codec.encode(&msg));
                Some((Ok::<Bytes, std::io::Error>(frame), Some(rx)))
            }
            Some(Err(e)) => Some((Ok(end_stream(Some(&e))), None)),
            None => Some((Ok(end_stream(None)), None)),
        }
    });
    let ct = Kind {
        codec,
        stream: true,
    }
    .content_type();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static(ct))],
        Body::from_stream(body),
    )
        .into_response()
}

/// A streaming reply that fails before its first message.
pub fn stream_error(codec: Codec, err: RpcError) -> Response {
    let (tx, rx) = mpsc::channel::<Result<crate::envd::proto::process::ListRequest, RpcError>>(1);
    let _ = tx.try_send(Err(err));
    stream_response(codec, rx)
}

/// The `connect-timeout-ms` header: the deadline the client set.
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("connect-timeout-ms")?.to_str().ok()?;
    let ms: u64 = v.trim().parse().ok()?;
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// The `Keepalive-Ping-Interval` header (seconds): how often a stream
/// sends keepalive messages so that the client's read timeout doesn't fire.
pub fn keepalive(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("keepalive-ping-interval")?.to_str().ok()?;
    let s: u64 = v.trim().parse().ok()?;
    (s > 0).then(|| Duration::from_secs(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envd::proto::filesystem::{EntryInfo, FileType, ListDirRequest};
    use crate::envd::proto::process::{process_event, ProcessEvent, Signal, StartResponse};

    #[test]
    fn content_types() {
        assert_eq!(
            Kind::from_content_type("application/connect+json; charset=utf-8"),
            Some(Kind {
                codec: Codec::Json,
                stream: true
            })
        );
        assert_eq!(
            Kind::from_content_type("application/proto"),
            Some(Kind {
                codec: Codec::Proto,
                stream: false
            })
        );
        assert_eq!(Kind::from_content_type("text/plain"), None);
    }

    #[test]
    fn envelopes_round_trip_and_reject_truncation() {
        let e = envelope(0, b"hello");
        assert_eq!(&e[..5], &[0, 0, 0, 0, 5]);
        assert_eq!(parse_envelope(&e).unwrap(), Some((0, &b"hello"[..], 10)));
        assert_eq!(parse_envelope(&e[..7]).unwrap(), None);
        assert_eq!(parse_envelope(&e[..3]).unwrap(), None);
        assert!(single_envelope(&e[..7]).is_err());
        assert_eq!(single_envelope(&e).unwrap(), b"hello");
        let huge = [0u8, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(parse_envelope(&huge), Err(Error::TooLarge(_))));
        let compressed = envelope(COMPRESSED, b"x");
        assert_eq!(
            single_envelope(&compressed).unwrap_err().code,
            Code::Unimplemented
        );
    }

    #[test]
    fn end_stream_carries_the_error() {
        let e = end_stream(Some(&RpcError::new(Code::NotFound, "no such process")));
        assert_eq!(e[0], END_STREAM);
        let v: serde_json::Value = serde_json::from_slice(&e[5..]).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
        assert_eq!(v["error"]["message"], "no such process");
        let ok = end_stream(None);
        assert_eq!(&ok[5..], b"{}");
    }

    #[test]
    fn json_mapping_matches_protobuf_json() {
        // bytes are base64, 64-bit integers strings, enums names, fields camelCase.
        let ev = StartResponse {
            event: Some(ProcessEvent {
                event: Some(process_event::Event::Data(process_event::DataEvent {
                    output: Some(process_event::data_event::Output::Stdout(
                        Bytes::from_static(b"\x00\xffhi"),
                    )),
                })),
            }),
        };
        let j: serde_json::Value = serde_json::from_slice(&Codec::Json.encode(&ev)).unwrap();
        assert_eq!(j["event"]["data"]["stdout"], "AP9oaQ==");
        let entry = EntryInfo {
            size: 5,
            r#type: FileType::Directory as i32,
            symlink_target: Some("/x".into()),
            ..Default::default()
        };
        let j: serde_json::Value = serde_json::from_slice(&Codec::Json.encode(&entry)).unwrap();
        assert_eq!(j["size"], "5");
        assert_eq!(j["type"], "FILE_TYPE_DIRECTORY");
        assert_eq!(j["symlinkTarget"], "/x");
        // What the SDK sends: enum names, unknown fields ignored, empty body.
        let r: crate::envd::proto::process::SendSignalRequest = Codec::Json
            .decode(br#"{"process":{"pid":7},"signal":"SIGNAL_SIGKILL","future":1}"#)
            .unwrap();
        assert_eq!(r.signal, Signal::Sigkill as i32);
        let l: ListDirRequest = Codec::Json.decode(b"").unwrap();
        assert_eq!(l.depth, 0);
        assert_eq!(
            Codec::Json
                .decode::<ListDirRequest>(b"{\"depth\": \"x\"}")
                .unwrap_err()
                .code,
            Code::InvalidArgument
        );
        // Binary protobuf round trip.
        let back: StartResponse = Codec::Proto.decode(&Codec::Proto.encode(&ev)).unwrap();
        assert_eq!(back, ev);
    }

    #[test]
    fn io_errors_map_to_codes() {
        let nf = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert_eq!(RpcError::io("/x", &nf).code, Code::NotFound);
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(RpcError::io("/x", &full).code, Code::ResourceExhausted);
    }
}
