//! States and modes kept as text in `state.db` (VM status, proxy secret kind, proxy mode): one
//! enum each, read and written through rusqlite with the text the database has always held.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use slicer_api::VmStatus;
use slicer_proxy::control::{Mode, SecretKind};

/// An enum stored as one of a fixed set of words.
pub trait TextColumn: Sized + Copy {
    /// What the column holds, for the error about a word this code does not know.
    const WHAT: &'static str;
    fn to_text(self) -> &'static str;
    fn from_text(s: &str) -> Option<Self>;
}

/// A [`TextColumn`] value as a SQL parameter or column (`Text(VmStatus::Running)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Text<T>(pub T);

impl<T: TextColumn> ToSql for Text<T> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.0.to_text()))
    }
}

impl<T: TextColumn> FromSql for Text<T> {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let text = value.as_str()?;
        T::from_text(text)
            .map(Text)
            .ok_or_else(|| FromSqlError::Other(format!("unknown {} {text:?} in the state database", T::WHAT).into()))
    }
}

impl TextColumn for VmStatus {
    const WHAT: &'static str = "VM status";
    fn to_text(self) -> &'static str {
        self.as_str()
    }
    fn from_text(s: &str) -> Option<Self> {
        VmStatus::parse(s)
    }
}

impl TextColumn for SecretKind {
    const WHAT: &'static str = "proxy secret kind";
    fn to_text(self) -> &'static str {
        self.as_str()
    }
    fn from_text(s: &str) -> Option<Self> {
        [SecretKind::Bearer, SecretKind::Basic]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

impl TextColumn for Mode {
    const WHAT: &'static str = "proxy mode";
    fn to_text(self) -> &'static str {
        self.as_str()
    }
    fn from_text(s: &str) -> Option<Self> {
        [Mode::Strict, Mode::Audit].into_iter().find(|m| m.as_str() == s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value goes in and comes out as the same word, and an unknown word is an error
    /// naming the column.
    #[test]
    fn words_round_trip_and_unknown_words_are_named() {
        let conn = rusqlite::Connection::open_in_memory().expect("db");
        let back = |v: &dyn ToSql| -> String { conn.query_row("SELECT ?1", [v], |r| r.get(0)).expect("select") };
        for s in [VmStatus::Running, VmStatus::Stopped] {
            assert_eq!(back(&Text(s)), s.as_str());
            let got: Text<VmStatus> = conn.query_row("SELECT ?1", [s.as_str()], |r| r.get(0)).expect("read");
            assert_eq!(got.0, s);
        }
        assert_eq!(back(&Text(SecretKind::Basic)), "basic");
        assert_eq!(back(&Text(Mode::Audit)), "audit");
        let err = conn
            .query_row("SELECT 'Paused?'", [], |r| r.get::<_, Text<VmStatus>>(0))
            .expect_err("unknown");
        assert!(err.to_string().contains("unknown VM status \"Paused?\""), "{err}");
    }
}
