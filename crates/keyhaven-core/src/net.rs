//! Values that name where and how long to connect: a TCP [`Port`] and a
//! [`ConnectTimeout`]. Each range and its message live here only; callers
//! collect the message under their own field name, so that several problems
//! in one request are still reported together.

use std::time::Duration;

use crate::error::ValidationErrors;

/// A TCP port, 1–65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port(u16);

impl Port {
    /// SSH's default port.
    pub const SSH: Port = Port(22);
    pub const RANGE_MESSAGE: &'static str = "Port must be between 1 and 65535";

    pub fn new(n: i64) -> Result<Port, &'static str> {
        match u16::try_from(n) {
            Ok(p) if p >= 1 => Ok(Port(p)),
            _ => Err(Self::RANGE_MESSAGE),
        }
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

/// How long to wait for a remote system, 1–300 seconds (TrueNAS's
/// `connect_timeout`, also the bound of a connection test's `timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnectTimeout(u16);

impl ConnectTimeout {
    /// TrueNAS's default.
    pub const DEFAULT: ConnectTimeout = ConnectTimeout(10);
    pub const RANGE_MESSAGE: &'static str = "Timeout must be between 1 and 300 seconds";

    pub fn new(secs: i64) -> Result<ConnectTimeout, &'static str> {
        match u16::try_from(secs) {
            Ok(s) if (1..=300).contains(&s) => Ok(ConnectTimeout(s)),
            _ => Err(Self::RANGE_MESSAGE),
        }
    }

    pub fn secs(self) -> u64 {
        u64::from(self.0)
    }

    pub fn duration(self) -> Duration {
        Duration::from_secs(self.secs())
    }
}

impl ValidationErrors {
    /// Keep the value of a check of several fields, or add its errors (named
    /// relative to the checked block) under `prefix` (empty: as they are).
    pub fn take_all<T>(&mut self, prefix: &str, checked: Result<T, ValidationErrors>) -> Option<T> {
        match checked {
            Ok(v) => Some(v),
            Err(e) => {
                self.0.extend(e.0.into_iter().map(|e| e.prefixed(prefix)));
                None
            }
        }
    }

    /// Keep the value of a check, or record its message under `attribute`.
    pub fn take<T>(&mut self, attribute: impl Into<String>, checked: Result<T, &'static str>) -> Option<T> {
        match checked {
            Ok(v) => Some(v),
            Err(m) => {
                self.add(attribute, m);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_timeouts_have_their_ranges() {
        for bad in [i64::MIN, -1, 0, 65536, i64::MAX] {
            assert_eq!(Port::new(bad), Err(Port::RANGE_MESSAGE), "{bad}");
        }
        assert_eq!(Port::new(1).map(Port::get), Ok(1));
        assert_eq!(Port::new(65535).map(Port::get), Ok(65535));
        for bad in [-5, 0, 301, 65537 + 10] {
            assert_eq!(ConnectTimeout::new(bad), Err(ConnectTimeout::RANGE_MESSAGE), "{bad}");
        }
        assert_eq!(ConnectTimeout::new(300).map(ConnectTimeout::secs), Ok(300));
        assert_eq!(ConnectTimeout::new(1).map(|t| t.duration()), Ok(Duration::from_secs(1)));
    }

    #[test]
    fn take_collects_every_message() {
        let mut errs = ValidationErrors::new();
        assert_eq!(errs.take("x.port", Port::new(0)), None);
        assert_eq!(errs.take("x.connect_timeout", ConnectTimeout::new(0)), None);
        assert_eq!(errs.take("x.port2", Port::new(22)), Some(Port::SSH));
        let attrs: Vec<&str> = errs.0.iter().map(|e| e.attribute.as_str()).collect();
        assert_eq!(attrs, ["x.port", "x.connect_timeout"]);
    }
}
