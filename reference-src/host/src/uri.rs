//! Migration URIs as QMP's `migrate`, `migrate-incoming` and `migrate-recover` take them.
//!
//! This module owns parsing and printing of `tcp:HOST:PORT`, `unix:PATH` and `defer`. `HOST` may
//! be a name, an IPv4 address, a bracketed IPv6 address (`tcp:[::1]:4444`) or empty
//! (`tcp::4444`, every address, for listening). The port is numeric. Other QEMU schemes (`fd:`,
//! `exec:`, `file:`, `rdma:`) and `tcp` options (`,ipv4`, `,to=`) are rejected by name.

use std::fmt;
use std::path::PathBuf;

/// A parsed migration URI.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MigrationUri {
    /// `tcp:HOST:PORT`; `host` is without brackets and may be empty.
    Tcp {
        /// Host name or address, IPv6 without brackets; empty means every address.
        host: String,
        /// Port (0 when listening: any free port).
        port: u16,
    },
    /// `unix:PATH`.
    Unix {
        /// Socket path.
        path: PathBuf,
    },
    /// `defer`: `-incoming defer`, wait for `migrate-incoming`.
    Defer,
}

/// Why a URI did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// The string is empty.
    #[error("empty migration URI")]
    Empty,
    /// A scheme QEMU has but qmig does not support.
    #[error("unsupported migration URI scheme '{0}'")]
    Unsupported(String),
    /// No known scheme.
    #[error("unknown migration URI '{0}'")]
    Unknown(String),
    /// `tcp:` without `:PORT`.
    #[error("missing port in '{0}'")]
    MissingPort(String),
    /// The port is not a number in 0..=65535.
    #[error("invalid port '{0}'")]
    BadPort(String),
    /// A bracketed IPv6 host without its closing bracket, or brackets around a non-address.
    #[error("invalid host in '{0}'")]
    BadHost(String),
    /// `tcp:` options such as `,ipv4` or `,to=`.
    #[error("tcp options are not supported: '{0}'")]
    Options(String),
    /// `unix:` without a path.
    #[error("empty unix socket path")]
    EmptyPath,
}

impl MigrationUri {
    /// Parses a URI.
    pub fn parse(s: &str) -> Result<Self, UriError> {
        if s.is_empty() {
            return Err(UriError::Empty);
        }
        if s == "defer" {
            return Ok(Self::Defer);
        }
        if let Some(rest) = s.strip_prefix("tcp:") {
            return parse_tcp(rest, s);
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(UriError::EmptyPath);
            }
            return Ok(Self::Unix {
                path: PathBuf::from(path),
            });
        }
        for scheme in ["fd", "exec", "file", "rdma", "vsock", "channels"] {
            if s.strip_prefix(scheme).is_some_and(|r| r.starts_with(':')) {
                return Err(UriError::Unsupported(scheme.to_owned()));
            }
        }
        Err(UriError::Unknown(s.to_owned()))
    }

    /// The `HOST:PORT` string for `std::net` (`[v6]:port`, `0.0.0.0:port` for an empty host).
    pub fn socket_addr_string(&self) -> Option<String> {
        match self {
            Self::Tcp { host, port } if host.is_empty() => Some(format!("0.0.0.0:{port}")),
            Self::Tcp { host, port } if host.contains(':') => Some(format!("[{host}]:{port}")),
            Self::Tcp { host, port } => Some(format!("{host}:{port}")),
            _ => None,
        }
    }
}

fn parse_tcp(rest: &str, whole: &str) -> Result<MigrationUri, UriError> {
    if rest.contains(',') {
        return Err(UriError::Options(whole.to_owned()));
    }
    let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
        let close = inner
            .find(']')
            .ok_or_else(|| UriError::BadHost(whole.to_owned()))?;
        let host = &inner[..close];
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(UriError::BadHost(whole.to_owned()));
        }
        let after = &inner[close + 1..];
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| UriError::MissingPort(whole.to_owned()))?;
        (host, port)
    } else {
        let colon = rest
            .rfind(':')
            .ok_or_else(|| UriError::MissingPort(whole.to_owned()))?;
        let host = &rest[..colon];
        if host.contains(':') {
            // An IPv6 address must be bracketed.
            return Err(UriError::BadHost(whole.to_owned()));
        }
        (host, &rest[colon + 1..])
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(UriError::BadPort(port.to_owned()));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| UriError::BadPort(port.to_owned()))?;
    Ok(MigrationUri::Tcp {
        host: host.to_owned(),
        port,
    })
}

impl std::str::FromStr for MigrationUri {
    type Err = UriError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Self::Unix { path } => write!(f, "unix:{}", path.display()),
            Self::Defer => f.write_str("defer"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for (s, uri) in [
            (
                "tcp:127.0.0.1:4444",
                MigrationUri::Tcp {
                    host: "127.0.0.1".into(),
                    port: 4444,
                },
            ),
            (
                "tcp:localhost:0",
                MigrationUri::Tcp {
                    host: "localhost".into(),
                    port: 0,
                },
            ),
            (
                "tcp::4444",
                MigrationUri::Tcp {
                    host: String::new(),
                    port: 4444,
                },
            ),
            (
                "tcp:[::1]:65535",
                MigrationUri::Tcp {
                    host: "::1".into(),
                    port: 65535,
                },
            ),
            (
                "unix:/tmp/a b.sock",
                MigrationUri::Unix {
                    path: "/tmp/a b.sock".into(),
                },
            ),
            ("defer", MigrationUri::Defer),
        ] {
            assert_eq!(MigrationUri::parse(s), Ok(uri.clone()), "{s}");
            assert_eq!(uri.to_string(), s);
        }
    }

    #[test]
    fn rejects() {
        use UriError::*;
        for (s, e) in [
            ("", Empty),
            ("tcp:1.2.3.4", MissingPort("tcp:1.2.3.4".into())),
            ("tcp:1.2.3.4:", BadPort(String::new())),
            ("tcp:1.2.3.4:65536", BadPort("65536".into())),
            ("tcp:1.2.3.4:+1", BadPort("+1".into())),
            ("tcp:::1:4", BadHost("tcp:::1:4".into())),
            ("tcp:[::1:4", BadHost("tcp:[::1:4".into())),
            ("tcp:[host]:4", BadHost("tcp:[host]:4".into())),
            ("tcp:[::1]", MissingPort("tcp:[::1]".into())),
            ("tcp:h:1,ipv4", Options("tcp:h:1,ipv4".into())),
            ("unix:", EmptyPath),
            ("fd:mig", Unsupported("fd".into())),
            ("exec:cat", Unsupported("exec".into())),
            ("http://x", Unknown("http://x".into())),
        ] {
            assert_eq!(MigrationUri::parse(s), Err(e), "{s}");
        }
    }

    #[test]
    fn socket_addr_strings() {
        let a = |s: &str| MigrationUri::parse(s).unwrap().socket_addr_string();
        assert_eq!(a("tcp::5").as_deref(), Some("0.0.0.0:5"));
        assert_eq!(a("tcp:[::1]:5").as_deref(), Some("[::1]:5"));
        assert_eq!(a("tcp:h:5").as_deref(), Some("h:5"));
        assert_eq!(a("defer"), None);
    }

    proptest::proptest! {
        #[test]
        fn any_string_parses_or_errs_without_panic(s in ".{0,64}") {
            if let Ok(uri) = MigrationUri::parse(&s) {
                // Whatever parses prints back to something that parses to the same URI.
                proptest::prop_assert_eq!(MigrationUri::parse(&uri.to_string()), Ok(uri));
            }
        }

        #[test]
        fn tcp_round_trips(host in "[a-z0-9.-]{0,20}", port: u16, v6: [u16; 8]) {
            let uri = MigrationUri::Tcp { host, port };
            proptest::prop_assert_eq!(MigrationUri::parse(&uri.to_string()), Ok(uri));
            let v6 = std::net::Ipv6Addr::from(v6).to_string();
            let uri = MigrationUri::Tcp { host: v6, port };
            proptest::prop_assert_eq!(MigrationUri::parse(&uri.to_string()), Ok(uri));
        }

        #[test]
        fn unix_round_trips(path in "[^\\x00]{1,40}") {
            let uri = MigrationUri::Unix { path: PathBuf::from(&path) };
            proptest::prop_assert_eq!(MigrationUri::parse(&format!("unix:{path}")), Ok(uri));
        }
    }
}
