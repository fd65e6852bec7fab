//! A small blocking client for a member's admin HTTP endpoint, shared by the operator commands
//! (`clusterstats`, `master`, `map`). Every failure is one line that names the address and what to
//! check.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::Value;

/// The admin address used when `--node` is not given.
pub const DEFAULT_NODE: &str = "127.0.0.1:5801";
/// The default admin port, for `--node HOST`.
const DEFAULT_ADMIN_PORT: u16 = 5801;
/// How long a plain request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The most a reply body may hold (a map value can be as large as `net.frame_bytes_max`, at most
/// 1 GiB).
const BODY_BYTES_MAX: u64 = 1 << 30;

/// A member's admin endpoint.
#[derive(Debug)]
pub struct AdminClient {
    base: String,
    node: String,
    agent: ureq::Agent,
}

/// A reply of the admin endpoint: status and JSON body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

/// A reply of the admin endpoint whose body may be text (a map value) rather than JSON.
#[derive(Debug)]
pub struct TextReply {
    pub status: u16,
    pub text: String,
}

/// A request method of [`AdminClient::send`].
#[derive(Debug, Clone, Copy)]
pub enum Method {
    Get,
    Put,
    Post,
    Delete,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Post => "POST",
            Method::Delete => "DELETE",
        }
    }
}

impl AdminClient {
    /// A client for `node` (`host:port`, `host` for port 5801, or an `http://` URL); requests
    /// give up after `timeout`.
    pub fn new(node: &str, timeout: Duration) -> Result<AdminClient, String> {
        let node = node.trim();
        if node.is_empty() {
            return Err("--node must name a member's admin address, like 127.0.0.1:5801".to_string());
        }
        let base = if let Some(rest) = node.strip_prefix("http://") {
            format!("http://{}", rest.trim_end_matches('/'))
        } else if node.contains("://") {
            return Err(format!("--node {node}: only http:// is supported by the admin endpoint"));
        } else if let Ok(addr) = node.parse::<SocketAddr>() {
            format!("http://{addr}")
        } else if let Ok(ip) = node.parse::<IpAddr>() {
            format!("http://{}", SocketAddr::new(ip, DEFAULT_ADMIN_PORT))
        } else if node.contains(':') {
            format!("http://{node}")
        } else {
            format!("http://{node}:{DEFAULT_ADMIN_PORT}")
        };
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            // The admin endpoint is on a management network: never go through an HTTP proxy.
            .proxy(None)
            .max_redirects(0)
            .user_agent(concat!("grapevine-cli/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(AdminClient { base, node: node.to_string(), agent: ureq::Agent::new_with_config(config) })
    }

    /// The address as given, for messages.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// `GET path`, expecting a JSON body (whatever the status).
    pub fn get(&self, path: &str) -> Result<Reply, String> {
        let response = self.agent.get(format!("{}{path}", self.base)).call();
        self.reply("GET", path, response)
    }

    /// `POST path` with a JSON body, expecting a JSON body (whatever the status).
    pub fn post(&self, path: &str, body: &Value) -> Result<Reply, String> {
        let response = self.agent.post(format!("{}{path}", self.base)).send_json(body);
        self.reply("POST", path, response)
    }

    /// `method path` with an optional text body (PUT and POST); the reply body as text, whatever the
    /// status. `path` must be percent-encoded already (see [`path_segment`]).
    pub fn send(&self, method: Method, path: &str, body: Option<&str>) -> Result<TextReply, String> {
        let url = format!("{}{path}", self.base);
        let response = match method {
            Method::Get => self.agent.get(url).call(),
            Method::Delete => self.agent.delete(url).call(),
            Method::Put => {
                self.agent.put(url).header("content-type", "text/plain; charset=utf-8").send(body.unwrap_or_default())
            }
            Method::Post => {
                self.agent.post(url).header("content-type", "text/plain; charset=utf-8").send(body.unwrap_or_default())
            }
        };
        let (status, text) = self.read(response)?;
        Ok(TextReply { status, text })
    }

    /// `GET path` for a reply that streams (a subscription): no overall time limit, only on
    /// connecting. Returns the status and a reader of the body.
    pub fn stream(&self, path: &str, connect_timeout: Duration) -> Result<(u16, impl std::io::Read), String> {
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(connect_timeout))
            .http_status_as_error(false)
            .proxy(None)
            .max_redirects(0)
            .user_agent(concat!("grapevine-cli/", env!("CARGO_PKG_VERSION")))
            .build();
        let agent = ureq::Agent::new_with_config(config);
        let response = agent.get(format!("{}{path}", self.base)).call().map_err(|e| self.unreachable(&e))?;
        let status = response.status().as_u16();
        // Not limited as a whole (it streams until interrupted); the caller bounds each line.
        Ok((status, response.into_body().into_reader()))
    }

    /// The JSON body of a reply of `method path`; an error that says what answered when it is not
    /// JSON.
    pub fn json(&self, method: Method, path: &str, reply: &TextReply) -> Result<Value, String> {
        self.parse_json(method.name(), path, reply.status, &reply.text)
    }

    /// The status and the body as text (at most `BODY_BYTES_MAX`) of a reply.
    fn read(&self, response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<(u16, String), String> {
        let mut response = response.map_err(|e| self.unreachable(&e))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(BODY_BYTES_MAX)
            .read_to_string()
            .map_err(|e| self.unreachable(&e))?;
        Ok((status, text))
    }

    fn reply(
        &self,
        method: &str,
        path: &str,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Reply, String> {
        let (status, text) = self.read(response)?;
        let body = self.parse_json(method, path, status, &text)?;
        Ok(Reply { status, body })
    }

    fn parse_json(&self, method: &str, path: &str, status: u16, text: &str) -> Result<Value, String> {
        serde_json::from_str(text).map_err(|_| {
            format!(
                "{} answered {method} {path} with HTTP {status} and a body that is not JSON: is it the admin \
                 port (admin_port, default 5801) of a grapevine member?",
                self.node
            )
        })
    }

    fn unreachable(&self, error: &ureq::Error) -> String {
        let why = match error {
            ureq::Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
            ureq::Error::Io(e) => e.to_string(),
            ureq::Error::Timeout(_) => "no answer in time".to_string(),
            ureq::Error::HostNotFound => "host not found".to_string(),
            ureq::Error::Protocol(_) => "the reply is not HTTP".to_string(),
            other => other.to_string(),
        };
        let why = why.replace(['\n', '\r'], " ");
        format!(
            "cannot reach the admin endpoint at {}: {why}; check that a grapevine member runs there, that --node is \
             its admin address (admin_port, default 5801, auto-incremented; the `grapevine node running` log line \
             shows it) and that admin_enabled is true",
            self.node
        )
    }
}

/// The `error` field of an error reply, or the whole body.
pub fn error_message(body: &Value) -> String {
    body.get("error").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| body.to_string())
}

/// `text` as one URL path segment: every byte but the unreserved letters, digits, `-`, `_` and
/// `~` percent-encoded (`.` too, so that `.` and `..` stay names rather than path steps).
pub fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses() {
        let base = |node: &str| AdminClient::new(node, REQUEST_TIMEOUT).unwrap().base;
        assert_eq!(base("127.0.0.1:5802"), "http://127.0.0.1:5802");
        assert_eq!(base("10.0.0.1"), "http://10.0.0.1:5801");
        assert_eq!(base("::1"), "http://[::1]:5801");
        assert_eq!(base("[::1]:6000"), "http://[::1]:6000");
        assert_eq!(base("db-1"), "http://db-1:5801");
        assert_eq!(base("db-1:6000"), "http://db-1:6000");
        assert_eq!(base("http://db-1:6000/"), "http://db-1:6000");
        assert!(AdminClient::new("https://db-1", REQUEST_TIMEOUT).is_err());
        assert!(AdminClient::new("", REQUEST_TIMEOUT).is_err());
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(path_segment("user-1_a~b"), "user-1_a~b");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
        assert_eq!(path_segment(".."), "%2E%2E");
        assert_eq!(path_segment("?#%"), "%3F%23%25");
        assert_eq!(path_segment("é"), "%C3%A9");
    }
}
